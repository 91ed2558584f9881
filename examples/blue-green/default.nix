# A blue-green service profile for hail: a thin layer over blue-green.sh (which does
# the switch) and nginx-reload.sh (the proxy's drain-aware reload). See README.md in
# this directory. A Hydra job:
#
#   web = import ./examples/blue-green {
#     inherit pkgs;
#     name = "web";
#     serve = port: "${myApp}/bin/my-app --listen 127.0.0.1:${toString port}";
#     healthCheck = port: "${pkgs.curl}/bin/curl -fsS http://127.0.0.1:${toString port}/health";
#     ports = { proxy = 8080; blue = 8081; green = 8082; };
#   };
#
# Only pkgs.runCommand, pkgs.writeText and pkgs.writeShellScript are used, plus
# pkgs.lib, pkgs.nginx and a few tools for the defaults of `nginx` and `path`, so the
# tests can build it without nixpkgs (tests/integration/common/stub-pkgs.nix).
{
  pkgs,
  # The units are NAME@blue.service, NAME@green.service and NAME-proxy.service.
  name,
  # port -> the command (ExecStart=) that runs this version on 127.0.0.1:port.
  serve,
  # port -> shell text that exits 0 once the colour on port is healthy.
  healthCheck,
  ports ? {
    proxy = 8080;
    blue = 8081;
    green = 8082;
  },
  healthTimeout ? 30,
  # More [Service] lines for both colours (User=, Environment=, …).
  serviceConfig ? "",
  nginx ? "${pkgs.nginx}/bin/nginx",
  # What blue-green.sh and nginx-reload.sh run: cmp, cp, date, mv, sleep, pgrep, systemctl.
  path ? pkgs.lib.makeBinPath [
    pkgs.coreutils
    pkgs.diffutils
    pkgs.procps
    pkgs.systemd
  ],
  unitDir ? "/run/systemd/system",
}:

let
  state = "/run/${name}-blue-green";
  q = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";

  # Store paths that depend only on their own text, so that a new version of the
  # service changes its colours' units and nothing else: the proxy's unit stays the
  # same and the proxy is reloaded, not restarted.
  nginxConf = pkgs.writeText "${name}-nginx.conf" ''
    pid ${state}/nginx.pid;
    error_log stderr;
    worker_processes 1;
    events { worker_connections 1024; }
    http {
      access_log off;
      client_body_temp_path ${state}/client-body;
      proxy_temp_path ${state}/proxy;
      # upstream live { server 127.0.0.1:PORT; }, written by blue-green.sh
      include ${state}/upstream.conf;
      server {
        listen 127.0.0.1:${toString ports.proxy};
        location / { proxy_pass http://live; }
      }
    }
  '';
  nginxReload = pkgs.writeScript "${name}-nginx-reload" (builtins.readFile ./nginx-reload.sh);
  proxyUnit = pkgs.writeText "${name}-proxy.service" ''
    [Unit]
    Description=${name}: blue-green proxy on 127.0.0.1:${toString ports.proxy}

    [Service]
    Type=forking
    PIDFile=${state}/nginx.pid
    Environment=PATH=${path}
    ExecStart=${nginx} -e stderr -c ${nginxConf}
    ExecReload=${nginxReload} ${nginx} ${nginxConf} $MAINPID
  '';

  colour = c: port: {
    unit = pkgs.writeText "${name}-${c}.service" ''
      [Unit]
      Description=${name} (${c}, 127.0.0.1:${toString port})

      [Service]
      ExecStart=${serve port}
      Restart=on-failure
      RestartSec=1
      ${serviceConfig}
    '';
    upstream = pkgs.writeText "${name}-${c}-upstream.conf" ''
      upstream live { server 127.0.0.1:${toString port}; }
    '';
    healthCheck = pkgs.writeShellScript "${name}-${c}-health-check" (healthCheck port);
  };
  colours = {
    blue = colour "blue" ports.blue;
    green = colour "green" ports.green;
  };

  script = verb: ''
    #!/bin/sh
    export PATH=${q path}
    export BG_NAME=${q name} BG_UNIT_DIR=${q unitDir} BG_HEALTH_TIMEOUT=${q healthTimeout}
    export BG_SHARE=@out@/share/blue-green
    exec @out@/bin/blue-green ${verb}
  '';
  activate = pkgs.writeText "${name}-activate" (script "activate");
  deactivate = pkgs.writeText "${name}-deactivate" (script "deactivate");
in
if builtins.match "[A-Za-z0-9_.-]+" name == null then
  throw "blue-green: name \"${name}\" must be made of A-Z a-z 0-9 _ . -"
else
  pkgs.runCommand "${name}-blue-green" { } ''
    share=$out/share/blue-green
    mkdir -p "$out/bin" "$share/blue" "$share/green"
    cp ${./blue-green.sh} "$out/bin/blue-green"
    sed "s|@out@|$out|g" ${activate} > "$out/bin/activate"
    sed "s|@out@|$out|g" ${deactivate} > "$out/bin/deactivate"
    chmod +x "$out/bin/blue-green" "$out/bin/activate" "$out/bin/deactivate"
    ln -s ${proxyUnit} "$share/proxy.service"
    ${builtins.concatStringsSep "\n" (
      map (c: ''
        ln -s ${colours.${c}.unit} "$share/${c}/unit"
        ln -s ${colours.${c}.upstream} "$share/${c}/upstream.conf"
        ln -s ${colours.${c}.healthCheck} "$share/${c}/health-check"
      '') [ "blue" "green" ]
    )}
  ''
