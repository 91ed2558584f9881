# Library functions for flakes that deploy with hail: the Nix side of service and
# manager profiles. They are a thin layer: every decision at activation time (which
# units changed, what to restart, which instances to remove) is hail's own
# (`hail service …`, `hail manager …`, src/service.rs and src/manager.rs); these
# functions only lay out the profile the way hail expects it and write its
# bin/activate and bin/deactivate.
#
#   hailLib = import ./nix/lib { hail = pkgs: self.packages.${pkgs.stdenv.hostPlatform.system}.hail; };
#   hailLib.mkServiceProfile { inherit pkgs; name = "web"; units."web.service" = "…"; }
#
# `hail` is the hail package (or any path with bin/hail), or a function from `pkgs` to
# it; each function also takes `hail` to override it. Only `pkgs.runCommand`,
# `pkgs.writeText` and `pkgs.writeShellScript` are used, and no `lib`, so that the
# tests can build these profiles with real Nix but without nixpkgs
# (tests/integration/common/stub-pkgs.nix).
{ hail }:

let
  inherit (builtins)
    attrNames
    concatStringsSep
    isAttrs
    isFunction
    isPath
    isString
    match
    replaceStrings
    ;

  hailBin = pkgs: override: "${
    if override != null then
      override
    else if isFunction hail then
      hail pkgs
    else
      hail
  }/bin/hail";

  # One word for a POSIX shell: single-quoted, with ' written as '\''.
  shellArg = s: "'" + replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";

  mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (attrNames attrs);

  # What hail accepts (src/service.rs: Service::new, valid_unit_name).
  serviceNameIsValid = name: match "[A-Za-z0-9._+@-]+" name != null;
  unitNameIsValid =
    name:
    match "[A-Za-z0-9:_.\\\\@-]+[.](service|socket|timer|path|target|mount|slice)" name != null
    && match "[.].*" name == null;

  # A store path name may not contain @, : or \, which unit names may.
  storeName = replaceStrings [ "@" ":" "\\" ] [ "-" "-" "-" ];

  # A one-line absolute path names a file; any other string is the file's text.
  isFileName = s: isString s && match "/[^\n]*" s != null;

  # A unit: its text (a string), or the unit file (a path, a derivation, or a string
  # that is an absolute path such as "${pkgs.foo}/lib/systemd/system/foo.service").
  unitFile =
    pkgs: name: value:
    if isPath value || isAttrs value || isFileName value then
      value
    else if isString value then
      pkgs.writeText (storeName name) value
    else
      throw "mkServiceProfile: units.\"${name}\" must be the unit's text (a string), a path or a derivation";

  # A step: shell text (run by writeShellScript; "${pkgs.curl}/bin/curl -f …" is
  # text too) or an executable (a path or a derivation).
  stepFile =
    pkgs: name: what: value:
    if value == null then
      null
    else if isPath value || isAttrs value then
      value
    else if isString value then
      pkgs.writeShellScript "${storeName name}-${what}" value
    else
      throw "mkServiceProfile: ${what} must be shell text (a string), a path or a derivation";

  # Writes the executable script $out/bin/FILE: `#!/bin/sh`, then `line` (shell text,
  # quoted already) followed by `outSuffix` appended to the output's store path, or
  # nothing if `outSuffix` is null. ($out is a store path: it needs no quoting.)
  writeBin = file: line: outSuffix: ''
    printf '%s\n%s%s\n' '#!/bin/sh' ${shellArg line} ${
      if outSuffix == null then "''" else "\"$out\"${shellArg outSuffix}"
    } > "$out/bin/${file}"
    chmod +x "$out/bin/${file}"
  '';
in
{
  # A profile for one or more systemd units. Its bin/activate runs
  # `hail service activate`: installs the units into `unitDir`, reloads systemd,
  # restarts the units whose text changed (and only those), starts the others, stops
  # and removes units an earlier version had, then runs the health check until it
  # passes or `healthTimeout` seconds have passed (hail then rolls the profile back and
  # the previous version's activate puts its units back). bin/deactivate stops and
  # removes them.
  mkServiceProfile =
    {
      pkgs,
      # Names the profile's units; one service profile per name on a host.
      name,
      # Unit file name -> text, path or derivation: { "web.service" = "[Service]\n…"; }
      units,
      # Shell text (or an executable) run before anything is switched; failing stops
      # the activation with nothing changed. E.g. a database migration.
      preSwitch ? null,
      # Shell text (or an executable) retried every 0.5 s after the switch until it
      # exits 0, for at most healthTimeout seconds.
      healthCheck ? null,
      healthTimeout ? 60,
      # Runtime unit directory: empty after a reboot, when hail-activate@ installs the
      # units again; works on NixOS, whose /etc/systemd/system is generated.
      unitDir ? "/run/systemd/system",
      hail ? null,
    }:
    let
      bin = hailBin pkgs hail;
      badUnits = builtins.filter (n: !unitNameIsValid n) (attrNames units);
      files = builtins.mapAttrs (unitFile pkgs) units;
      preSwitchFile = stepFile pkgs name "pre-switch" preSwitch;
      healthCheckFile = stepFile pkgs name "health-check" healthCheck;
      # "${target}": a path is copied into the store (toString would not).
      link = file: target: ''ln -s ${shellArg "${target}"} "$out/${file}"'' + "\n";
      args = "--name ${shellArg name} --unit-dir ${shellArg unitDir}";
    in
    if !serviceNameIsValid name then
      throw "mkServiceProfile: name \"${name}\" must be one or more of A-Z a-z 0-9 . _ + - @"
    else if badUnits != [ ] then
      throw "mkServiceProfile: ${concatStringsSep ", " badUnits}: not a systemd unit file name (NAME.service, .socket, .timer, .path, .target, .mount or .slice)"
    else if units == { } then
      throw "mkServiceProfile: units is empty"
    else if match "/.*" unitDir == null then
      throw "mkServiceProfile: unitDir \"${unitDir}\" must be an absolute path"
    else
      pkgs.runCommand "${storeName name}-service-profile" { } (
        ''
          mkdir -p "$out/bin" "$out/lib/systemd/system"
        ''
        + concatStringsSep "" (mapAttrsToList (n: f: link "lib/systemd/system/${n}" f) files)
        + (if preSwitchFile == null then "" else link "bin/pre-switch" preSwitchFile)
        + (if healthCheckFile == null then "" else link "bin/health-check" healthCheckFile)
        + writeBin "activate" "exec ${shellArg bin} service activate ${args} --health-timeout ${shellArg healthTimeout} " ""
        + writeBin "deactivate" "exec ${shellArg bin} service deactivate ${args}" null
      );

  # A profile listing the hail instances a host without NixOS runs. Its bin/activate
  # runs `hail manager activate`: writes each instance's /etc/hail/PROFILE.env, its
  # poll period (a drop-in for hail@PROFILE.timer), enables and starts its timer and
  # enables its boot unit (hail-activate@PROFILE); instances an earlier version listed
  # and this one does not are taken down with their profile's bin/deactivate, their
  # timer and boot unit disabled and their files removed.
  mkManagerProfile =
    {
      pkgs,
      # name -> { jobUri; pollPeriod ? "5min"; profile ? name; netrcFile ? null;
      #           activateAtBoot ? true; environment ? { }; }
      instances,
      name ? "hail-manager",
      hail ? null,
    }:
    let
      bin = hailBin pkgs hail;
      # A path literal would be copied into the world-readable store by toJSON.
      secretsInStore = builtins.filter (
        n: instances.${n} ? netrcFile && isPath instances.${n}.netrcFile
      ) (attrNames instances);
      json = pkgs.writeText "hail-instances.json" (builtins.toJSON instances);
    in
    if secretsInStore != [ ] then
      throw "mkManagerProfile: instances.${builtins.head secretsInStore}.netrcFile is a Nix path, which would copy the credentials into the Nix store; give it as a string (\"/run/secrets/hydra-netrc\")"
    else
      pkgs.runCommand (storeName name) { } (
        ''
          mkdir -p "$out/bin" "$out/share/hail"
          ln -s ${json} "$out/share/hail/instances.json"
        ''
        + writeBin "activate" "exec ${shellArg bin} manager activate " "/share/hail/instances.json"
        + writeBin "deactivate" "exec ${shellArg bin} manager deactivate" null
      );
}
