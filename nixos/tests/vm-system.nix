# NixOS VM test of a whole host deployed by hail: services.hail.instances.system
# (profile = "system") switches the machine to another configuration of itself that a
# Hydra stand-in names as the job's latest build, then rolls back two broken ones: one
# whose switch fails (a unit that cannot start: switch-to-configuration exits 4), and
# one that cuts the host off from Hydra (it stops the stand-in, so hail's check after
# the switch gets no answer for confirmTimeout).
#
# The configurations hail deploys are specialisations of the machine: complete systems
# of the same VM, in its store and Nix database through the booted system's closure
# (its specialisation/ links), so nothing is substituted. The stand-in cannot name them
# in its own configuration (a specialisation would then contain its own store path):
# the test script publishes each build at run time, writing what the stand-in serves
# into /run/hydra-stand-in. It answers HEAD and GET of /job/hosts/main/machine/latest
# with a 302 to /build/ID (or a 404 before anything is published), and GET /build/ID
# with `Accept: application/json` with the build object, as real Hydra does (see
# ../shared/hydra/HYDRA.md).
#
# The VM boots its kernel directly, without a boot loader: a stand-in boot loader
# records which system switch-to-configuration made the boot default.
#
# Needs KVM and a full nixpkgs: it runs as `nix flake check` / `nix build
# .#checks.<system>.vm-system` on a networked Nix machine, not in hail's offline CI
# (there, nixos::flake_outputs_evaluate_against_a_stub_nixpkgs only evaluates its
# name, and units::every_nix_file_parses parses it).
{ pkgs, hailModule }:

let
  inherit (pkgs) lib;

  port = 3000;
  standInState = "/run/hydra-stand-in";
  # Which of the machine's configurations is running: "first" (as booted), "second",
  # "broken" or "cut off".
  label = "hail-test-configuration";
  bootDefault = "/run/hail-test-boot-default";

  hydraStandIn = pkgs.writeText "hydra-stand-in.py" ''
    import json
    import os
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    PORT = ${toString port}
    STATE = "${standInState}"
    LATEST = "/job/hosts/main/machine/latest"


    def published(name):
        try:
            with open(os.path.join(STATE, name)) as file:
                return file.read().strip()
        except FileNotFoundError:
            return None


    class Hydra(BaseHTTPRequestHandler):
        def answer(self):
            # Like Hydra: JSON only when application/json comes first in Accept.
            accept = self.headers.get("Accept", "")
            json_wanted = accept.split(",")[0].strip().startswith("application/json")
            base = "http://" + self.headers.get("Host", "127.0.0.1:%d" % PORT)
            if self.path == LATEST:
                latest = published("latest")
                if latest is not None:
                    location = base + "/build/" + latest
                    page = '<html><body><p>This item has moved <a href="%s">here</a>.</p></body></html>'
                    return 302, page % location, "text/html; charset=utf-8", location
                error = "There is no successful build to redirect to."
            elif self.path.startswith("/build/"):
                build_id = self.path[len("/build/"):]
                build = published("build-%s.json" % build_id) if build_id.isdigit() else None
                if build is not None and json_wanted:
                    return 200, build, "application/json", None
                error = "Build with ID %s doesn't exist." % build_id
            else:
                error = "Page not found."
            if json_wanted:
                return 404, json.dumps({"error": error}), "application/json", None
            return 404, "<html><body>%s</body></html>" % error, "text/html; charset=utf-8", None

        def reply(self, with_body):
            status, body, content_type, location = self.answer()
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Vary", "Accept")
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_GET(self):
            self.reply(True)

        def do_HEAD(self):
            self.reply(False)


    ThreadingHTTPServer(("127.0.0.1", PORT), Hydra).serve_forever()
  '';

  # What Hydra answers for build `id` of the job hosts:main:machine, whose output is
  # the NixOS system `system`.
  hydraBuild = id: system: {
    inherit id;
    finished = 1;
    buildstatus = 0;
    timestamp = 1700000000 + id * 100;
    starttime = 1700000010 + id * 100;
    stoptime = 1700000020 + id * 100;
    project = "hosts";
    jobset = "main";
    job = "machine";
    system = pkgs.stdenv.hostPlatform.system;
    # Only a string in Hydra's answer: no need to drag the .drv into the VM.
    drvpath = builtins.unsafeDiscardStringContext system.drvPath;
    nixname = system.name;
    releasename = null;
    priority = 100;
    jobsetevals = [ id ];
    buildoutputs.out.path = "${system}";
    buildproducts = { };
    buildmetrics = { };
  };
in
pkgs.testers.runNixOSTest {
  name = "hail-system";

  nodes.machine =
    { config, ... }:
    {
      imports = [ hailModule ];

      # Whether the Hydra stand-in runs: a configuration without it is one that cut
      # the host off from Hydra.
      options.hailTest.hydraReachable = lib.mkOption {
        type = lib.types.bool;
        default = true;
      };

      config = {
        # No network in the VM: never try cache.nixos.org.
        nix.settings.substituters = lib.mkForce [ ];
        # hail deploys only a build with bin/switch-to-configuration.
        system.switch.enable = true;
        system.build.installBootLoader = lib.mkForce (
          pkgs.writeShellScript "install-test-boot-loader" ''
            echo "$1" > ${bootDefault}
          ''
        );

        environment.etc.${label}.text = lib.mkDefault "first";

        systemd.services.hydra-stand-in = lib.mkIf config.hailTest.hydraReachable {
          wantedBy = [ "multi-user.target" ];
          before = [ "hail@system.service" ];
          serviceConfig.ExecStart = "${lib.getExe pkgs.python3} ${hydraStandIn}";
        };

        services.hail.instances.system = {
          profile = "system";
          jobUri = "http://127.0.0.1:${toString port}/job/hosts/main/machine";
          pollPeriod = "1h";
          # Enough for the stand-in to come up again when it restarts; short, because
          # the cut-off system makes the test wait for all of it.
          confirmTimeout = 15;
        };
        # The test starts the passes itself; keep the timer from racing it.
        systemd.timers."hail@system".timerConfig.OnBootSec = lib.mkForce "1h";

        specialisation = {
          second.configuration.environment.etc.${label}.text = "second";

          broken.configuration = {
            environment.etc.${label}.text = "broken";
            # Started by the switch, it fails: switch-to-configuration exits 4.
            systemd.services.hail-test-broken = {
              wantedBy = [ "multi-user.target" ];
              serviceConfig = {
                Type = "oneshot";
                ExecStart = "${pkgs.coreutils}/bin/false";
              };
            };
          };

          cutOff.configuration = {
            environment.etc.${label}.text = "cut off";
            # The switch stops the stand-in: Hydra no longer answers.
            hailTest.hydraReachable = false;
          };
        };
      };
    };

  testScript =
    { nodes, ... }:
    let
      systemOf = name: nodes.machine.specialisation.${name}.configuration.system.build.toplevel;
      builds = {
        "1" = hydraBuild 1 (systemOf "second");
        "2" = hydraBuild 2 (systemOf "broken");
        "3" = hydraBuild 3 (systemOf "cutOff");
      };
    in
    ''
      import json
      import shlex

      BUILDS = json.loads(r"""${builtins.toJSON builds}""")
      FIRST = "${nodes.machine.system.build.toplevel}"
      SECOND = BUILDS["1"]["buildoutputs"]["out"]["path"]


      def publish(build_id: int) -> None:
          """Makes build_id the job's latest successful build."""
          build = json.dumps(BUILDS[str(build_id)])
          machine.succeed(
              "mkdir -p ${standInState}",
              f"printf '%s' {shlex.quote(build)} > ${standInState}/build-{build_id}.json",
              f"echo {build_id} > ${standInState}/latest",
          )


      def runs(system: str, name: str) -> None:
          """The host runs system (whose /etc says name), and boots it next."""
          machine.succeed(
              f'test "$(readlink -f /run/current-system)" = {system}',
              f'test "$(readlink -f /nix/var/nix/profiles/system)" = {system}',
              f'test "$(cat ${bootDefault})" = {system}',
              f"grep -qx {shlex.quote(name)} /etc/${label}",
          )


      def generations() -> str:
          return machine.succeed("ls -d /nix/var/nix/profiles/system-*-link")


      def hail_said(text: str) -> None:
          machine.succeed(
              f"journalctl -o cat -u hail@system.service | grep -F -- {shlex.quote(text)}"
          )


      machine.wait_for_unit("multi-user.target")
      machine.wait_for_open_port(${toString port})

      with subtest("the system instance's units"):
          environment = machine.succeed(
              "systemctl show -p Environment --value hail@system.service"
          ).split()
          for setting in [
              "HAIL_PROFILE=system",
              "HAIL_NIXOS_OPERATION=switch",
              "HAIL_CONFIRM_TIMEOUT=15",
              "HAIL_ALLOW_REBOOT=false",
          ]:
              assert setting in environment, f"{setting} not in {environment}"
          # NixOS activates the system it boots: hail's boot activation is not wanted.
          machine.fail("systemctl is-active hail-activate@system.service")
          machine.succeed(f'test "$(readlink -f /run/current-system)" = {FIRST}')
          machine.succeed("grep -qx first /etc/${label}")

      with subtest("a pass switches the host to the job's latest build"):
          publish(1)
          machine.succeed("systemctl start hail@system.service")
          runs(SECOND, "second")

      with subtest("a second pass changes nothing"):
          before = generations()
          machine.succeed("systemctl start hail@system.service")
          runs(SECOND, "second")
          assert generations() == before, f"{before} became {generations()}"

      with subtest("a system whose switch fails is rolled back"):
          publish(2)
          machine.fail("systemctl start hail@system.service")
          runs(SECOND, "second")
          hail_said("switch-to-configuration switch exited with status 4")
          hail_said("rolled back to generation")
          # Remembered as failed: not switched to again while it is the latest.
          machine.fail("systemctl start hail@system.service")
          hail_said("it stays rolled back while it is Hydra's latest")
          runs(SECOND, "second")

      with subtest("a system that cuts the host off from Hydra is rolled back"):
          publish(3)
          machine.fail("systemctl start hail@system.service")
          hail_said("but then hail could not reach Hydra for 15 s")
          # The switch back to the second system started the stand-in again.
          machine.wait_for_open_port(${toString port})
          runs(SECOND, "second")
    '';
}
