# NixOS VM test: a machine with services.hail.instances.demo deploys a profile from a
# Hydra stand-in running on the same machine, runs its activation, then reboots and
# checks that the boot-time activation runs it again.
#
# The pass runs in hail@'s sandbox on NixOS's read-only store, and reads a secrets file
# (environmentFile).
#
# The stand-in answers the two requests of a pass the way real Hydra does (see
# ../shared/hydra/HYDRA.md): GET /job/demo/main/demo/latest is a 302 with an absolute
# Location to /build/1, and GET /build/1 with `Accept: application/json` is the build
# object, whose buildoutputs.out.path is the demo profile. That path is already in the
# VM's store (system.extraDependencies), so nothing has to be substituted.
#
# Needs KVM and a full nixpkgs: it runs as `nix flake check` / `nix build
# .#checks.<system>.vm` on a networked Nix machine, not in hail's offline CI.
{ pkgs, hailModule }:

let
  inherit (pkgs) lib;

  port = 3000;
  marker = "/run/hail-demo/activated";

  # What Hydra would have built: a profile whose bin/activate leaves a marker.
  demoProfile = pkgs.writeTextFile {
    name = "hail-demo-profile";
    destination = "/bin/activate";
    executable = true;
    text = ''
      #!${pkgs.runtimeShell}
      set -eu
      mkdir -p ${dirOf marker}
      echo activated >> ${marker}
    '';
  };

  build = {
    id = 1;
    finished = 1;
    buildstatus = 0;
    timestamp = 1700000000;
    starttime = 1700000010;
    stoptime = 1700000020;
    project = "demo";
    jobset = "main";
    job = "demo";
    system = pkgs.stdenv.hostPlatform.system;
    # Only a string in Hydra's answer: no need to drag the .drv into the VM.
    drvpath = builtins.unsafeDiscardStringContext demoProfile.drvPath;
    nixname = "hail-demo-profile";
    releasename = null;
    priority = 100;
    jobsetevals = [ 1 ];
    buildoutputs.out.path = "${demoProfile}";
    buildproducts = { };
    buildmetrics = { };
  };

  buildJson = pkgs.writeText "build-1.json" (builtins.toJSON build);

  hydraStandIn = pkgs.writeText "hydra-stand-in.py" ''
    import json
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    PORT = ${toString port}
    with open(sys.argv[1]) as build_json:
        BUILD = json.load(build_json)


    class Hydra(BaseHTTPRequestHandler):
        def reply(self, status, body, content_type, location=None):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Vary", "Accept")
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            # Like Hydra: JSON only when application/json comes first in Accept.
            accept = self.headers.get("Accept", "")
            json_wanted = accept.split(",")[0].strip().startswith("application/json")
            base = "http://" + self.headers.get("Host", "127.0.0.1:%d" % PORT)
            if self.path == "/job/demo/main/demo/latest":
                location = base + "/build/1"
                page = '<html><body><p>This item has moved <a href="%s">here</a>.</p></body></html>'
                self.reply(302, page % location, "text/html; charset=utf-8", location)
            elif self.path == "/build/1" and json_wanted:
                self.reply(200, json.dumps(BUILD), "application/json")
            elif json_wanted:
                error = {"error": "Page not found."}
                self.reply(404, json.dumps(error), "application/json")
            else:
                self.reply(404, "<html><body>Page not found.</body></html>", "text/html; charset=utf-8")


    ThreadingHTTPServer(("127.0.0.1", PORT), Hydra).serve_forever()
  '';
in
pkgs.testers.runNixOSTest {
  name = "hail";

  nodes.machine = {
    imports = [ hailModule ];

    # The profile Hydra "built" is in the store and registered in the VM's Nix db.
    system.extraDependencies = [ demoProfile ];
    # No network in the VM: never try cache.nixos.org.
    nix.settings.substituters = lib.mkForce [ ];

    systemd.services.hydra-stand-in = {
      wantedBy = [ "multi-user.target" ];
      before = [ "hail@demo.service" ];
      serviceConfig.ExecStart = "${lib.getExe pkgs.python3} ${hydraStandIn} ${buildJson}";
    };

    services.hail.instances.demo = {
      jobUri = "http://127.0.0.1:${toString port}/job/demo/main/demo";
      pollPeriod = "1h";
      environmentFile = "/run/hail-demo.env";
    };
    # Stands in for a secret that sops-nix or agenix would put there.
    systemd.tmpfiles.rules = [ "f /run/hail-demo.env 0600 root root - HAIL_TIMEOUT=30" ];
    # The test starts the passes itself; keep the timer from racing it.
    systemd.timers."hail@demo".timerConfig.OnBootSec = lib.mkForce "1h";
  };

  testScript = ''
    machine.wait_for_unit("multi-user.target")
    machine.wait_for_open_port(${toString port})

    with subtest("units are in place"):
        machine.succeed("systemctl is-active hail@demo.timer")
        for unit in ["hail@demo.service", "hail-activate@demo.service"]:
            machine.succeed(f"systemctl show -p EnvironmentFiles {unit} | grep -F /run/hail-demo.env")
            machine.succeed(f"test $(systemctl show -p NoNewPrivileges --value {unit}) = yes")
        # Boot-time activation ran and found no profile yet: success, nothing done.
        machine.succeed("systemctl is-active hail-activate@demo.service")
        machine.fail("test -e ${marker}")

    with subtest("a pass deploys the latest build and activates it"):
        machine.succeed("systemctl start hail@demo.service")
        machine.succeed(
            'test "$(readlink -f /nix/var/nix/profiles/demo)" = ${demoProfile}'
        )
        machine.succeed("test -L /nix/var/nix/profiles/demo-1-link")
        machine.succeed("test $(grep -c activated ${marker}) -eq 1")

    with subtest("a second pass is a no-op"):
        machine.succeed("systemctl start hail@demo.service")
        machine.fail("test -e /nix/var/nix/profiles/demo-2-link")
        machine.succeed("test $(grep -c activated ${marker}) -eq 1")

    with subtest("the boot-time unit activates the profile again after a reboot"):
        machine.shutdown()
        machine.start()
        machine.wait_for_unit("hail-activate@demo.service")
        # /run is empty after the reboot: the marker is from the boot-time activation.
        machine.succeed("test $(grep -c activated ${marker}) -eq 1")
        machine.succeed(
            'test "$(readlink -f /nix/var/nix/profiles/demo)" = ${demoProfile}'
        )
  '';
}
