# NixOS module for hail: pull-based continuous deployment of Nix profiles from Hydra.
#
# One instance (`services.hail.instances.<name>`) is one profile kept up to date with
# one Hydra job. The units, for an instance `web`:
#
#   hail@.service                    the pass, a template: `hail --oneshot` asks Hydra
#                                    for the job's latest build, substitutes it,
#                                    switches the profile and runs its bin/activate
#   hail@web.service.d/…             a drop-in per instance: its profile, job, secrets
#                                    and extra arguments
#   hail@web.timer                   a timer per instance (a unit of its own, there is
#                                    no hail@.timer template): a pass every pollPeriod
#   hail-activate@.service           the boot-time activation, a template: `hail
#                                    activate` runs the profile's bin/activate again
#   hail-activate@web.service.d/…    a drop-in per instance, wanted by multi-user.target
#                                    when activateAtBoot
#   hail-removed-instances.service   while any instance is defined, enabled or not:
#                                    runs bin/deactivate of the profiles of instances
#                                    that were removed or disabled
#
# There is no `services.hail.enable`: the module does something as soon as an instance
# is defined, and nothing at all while `services.hail.instances` is empty.
#
# An instance with `profile = "system"` deploys the whole NixOS host: hail switches
# to the job's system with its switch-to-configuration. Its operation,
# confirmTimeout, allowReboot and rebootWindow options are named after
# system.autoUpgrade's, and only such an instance may set them (docs/nixos-hosts.md).
#
# Style: no `with lib;`; the same conventions as nixpkgs' system.autoUpgrade module.
{ config, lib, ... }:

let
  cfg = config.services.hail;

  enabledInstances = lib.filterAttrs (_: instance: instance.enable) cfg.instances;

  # What hail-removed-instances.service compares with the profiles it remembers.
  currentProfiles = lib.unique (lib.mapAttrsToList (_: instance: instance.profile) enabledInstances);

  # Where hail-removed-instances.service remembers the enabled instances' profiles.
  instancesList = "${cfg.stateDir}/nixos-instances";

  hail = "${cfg.package}/bin/hail";

  # On the PATH of every hail unit: nix-env, the same Nix as the system's, and
  # systemd-run/journalctl, with which hail runs bin/activate in a transient unit.
  # Drop-ins repeat it: NixOS writes a PATH= line into each, which replaces the
  # template's.
  hailPath = [
    config.nix.package
    config.systemd.package
  ];

  # A path outside the Nix store, as a string: for secrets and for directories hail
  # writes. A Nix path literal (./netrc) would copy its file into the world-readable
  # store, so the type refuses one. (types.pathWith is in nixpkgs 25.05 and later.)
  externalPath = lib.types.pathWith {
    inStore = false;
    absolute = true;
  };

  # Where the profiles and hail's state are, for every unit that runs hail or a
  # profile's scripts.
  directoriesEnvironment = {
    HAIL_PROFILES_DIR = cfg.profilesDir;
    HAIL_STATE_DIR = cfg.stateDir;
  };

  # systemd creates a state directory under /var/lib itself (StateDirectory=, which
  # also orders the unit after the mount it is on); anywhere else systemd-tmpfiles
  # does, at boot and at every switch.
  stateDirectoryName =
    if lib.hasPrefix "/var/lib/" cfg.stateDir then lib.removePrefix "/var/lib/" cfg.stateDir else null;
  stateDirectoryConfig = lib.optionalAttrs (stateDirectoryName != null) {
    StateDirectory = stateDirectoryName;
  };

  # EnvironmentFile= of both drop-ins of an instance: systemd reads it when the unit
  # starts, so the secrets in it never pass through the store.
  environmentFileConfig =
    instance:
    lib.optionalAttrs (instance.environmentFile != null) {
      EnvironmentFile = instance.environmentFile;
    };

  # What both of an instance's drop-ins (hail@<name>, hail-activate@<name>) say:
  # drop-ins for the templates, not unit files of their own; the templates' PATH
  # (NixOS writes a PATH= line into every service it generates, drop-ins too, made
  # from the unit's `path` plus coreutils & co., which would otherwise replace the
  # template's and lose nix-env); never restarted by a switch; and the same profile
  # and job (hail activate refuses a profile deployed from another job).
  instanceDropin = instance: {
    overrideStrategy = "asDropin";
    path = hailPath;
    restartIfChanged = false;
    environment = {
      HAIL_PROFILE = instance.profile;
      HAIL_JOB_URI = instance.jobUri;
    };
  };

  # The sandbox of hail@ and hail-activate@, the same as in systemd/hail@.service. It
  # confines the pass (hail, nix-env, systemctl, journalctl), not bin/activate: under
  # systemd hail runs that in a transient unit of its own through systemd-run, which
  # none of this reaches, so activations may do anything as before. Nor does it
  # confine a compromised pass, which could ask PID 1 for anything the same way: it
  # keeps a faulty pass off host and kernel state that no pass needs. Left out:
  # - ProtectSystem=, ReadOnlyPaths=: nix-env writes the store (remounting NixOS's read-only one) and /nix/var/nix; full/strict trigger automounts such as /boot (systemd#23652).
  # - ProtectHome=: Nix keeps its binary-cache lookups in /root/.cache/nix.
  # - RestrictNamespaces=: nix-env, as root, unshares a mount namespace to remount a read-only store writable.
  # - CapabilityBoundingSet=: that remount needs CAP_SYS_ADMIN, which is nearly all of root's power anyway.
  # - SystemCallFilter=: would have to follow every Nix release (the remount needs @mount); the settings below block what no pass needs.
  # - MemoryDenyWriteExecute=: nothing in a pass generates code, and glibc could no longer load an NSS module that wants an executable stack.
  # - PrivateDevices=: ProtectClock='s implied DeviceAllow= already leaves a pass only the pseudo devices.
  # - PrivateNetwork=, IPAddressDeny=: a pass talks to Hydra and the binary caches, wherever they are.
  # - User=, DynamicUser=, PrivateUsers=: a pass switches root's profiles and, with the local store, writes the store.
  hardening = {
    NoNewPrivileges = true;
    PrivateTmp = true;
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    LockPersonality = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    # The journal, sd_notify, systemd-run and nix-daemon use AF_UNIX; Hydra and the
    # caches AF_INET and AF_INET6. (glibc's resolver does without AF_NETLINK.)
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
  };

  # Quoting for one word of a systemd ExecStart= line. This is what nixpkgs'
  # `utils.escapeSystemdExecArg` does, inlined so the module needs no `utils` argument.
  # `lib.escapeShellArgs` is not enough: systemd does accept a whole word in single
  # quotes ('--timeout' '600'), but it does not know the shell's `'\''` trick, it
  # still expands `%` specifiers and `$VAR` inside quotes, and it unescapes C escapes
  # there. A JSON string is a double-quoted word with C escapes, which systemd reads
  # back verbatim once `%` and `$` are doubled.
  escapeSystemdExecArg = arg: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg);
  escapeSystemdExecArgs = args: lib.concatMapStringsSep " " escapeSystemdExecArg args;

  # The variables options set, with the option to use instead (`.` stands for the
  # instance's own); an instance's `environment` must not set them as well.
  reservedVariables = {
    HAIL_PROFILE = ".profile";
    HAIL_JOB_URI = ".jobUri";
    HAIL_NETRC_FILE = ".netrcFile";
    HAIL_KEEP_GENERATIONS = ".keepGenerations";
    HAIL_NIXOS_OPERATION = ".operation";
    HAIL_CONFIRM_TIMEOUT = ".confirmTimeout";
    HAIL_ALLOW_REBOOT = ".allowReboot";
    HAIL_REBOOT_WINDOW = ".rebootWindow";
    HAIL_METRICS_FILE = "services.hail.metricsDir";
    HAIL_PROFILES_DIR = "services.hail.profilesDir";
    HAIL_STATE_DIR = "services.hail.stateDir";
  };

  # The one profile hail deploys NixOS systems to (src/system.rs), and the only
  # directory where NixOS boots its generations.
  systemProfile = "system";
  nixosProfilesDir = "/nix/var/nix/profiles";
  isSystemInstance = instance: instance.profile == systemProfile;

  # hail's own defaults for the options of a system instance (src/cli.rs); the
  # options default to them, and another instance must leave them so.
  systemDefaults = {
    operation = "switch";
    confirmTimeout = 60;
  };

  # The options of a system instance that are not at their defaults.
  systemOptionsSet =
    instance:
    lib.attrNames (
      lib.filterAttrs (_: isSet: isSet) {
        operation = instance.operation != systemDefaults.operation;
        confirmTimeout = instance.confirmTimeout != systemDefaults.confirmTimeout;
        allowReboot = instance.allowReboot;
        rebootWindow = instance.rebootWindow != null;
      }
    );

  # How a system instance's options reach hail: all of them, defaults included,
  # so that `systemctl show hail@<name>` says how the host is deployed.
  systemEnvironment =
    instance:
    {
      HAIL_NIXOS_OPERATION = instance.operation;
      HAIL_CONFIRM_TIMEOUT = toString instance.confirmTimeout;
      HAIL_ALLOW_REBOOT = lib.boolToString instance.allowReboot;
    }
    // lib.optionalAttrs (instance.rebootWindow != null) {
      HAIL_REBOOT_WINDOW = "${instance.rebootWindow.lower}-${instance.rebootWindow.upper}";
    };

  # HH:MM, as hail's --reboot-window reads it (system.autoUpgrade's own type,
  # [[:digit:]]{2}:[[:digit:]]{2}, would let 25:00 through to fail every pass).
  timeOfDay = lib.types.strMatching "([01][0-9]|2[0-3]):[0-5][0-9]";

  # A profile name, relative to the profiles directory: `web` or `hail-profiles/web`.
  # The same rules as hail's own `--profile` check.
  profileNameIsValid =
    profile:
    builtins.match "[A-Za-z0-9._+/-]+" profile != null
    && !(lib.hasPrefix "/" profile)
    && lib.all (component: component != "" && component != "." && component != "..") (
      lib.splitString "/" profile
    );

  # profilesDir and stateDir: absolute, made of the same safe characters, so that they
  # need no quoting in unit files, tmpfiles rules or the removal script.
  directoryIsValid = dir: lib.hasPrefix "/" dir && profileNameIsValid (lib.removePrefix "/" dir);

  # https?://HOST[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB[/]. No user:password@ (that
  # goes into netrcFile), no query, no fragment, and not the `…/latest` URL: hail
  # appends `/latest` itself. (POSIX ERE as builtins.match takes it: a literal [ or ]
  # is written [[] or []], a backslash escape is not portable.)
  jobUriIsValid =
    uri:
    builtins.match ''https?://([[][0-9A-Fa-f:.]+[]]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[^?#[:space:]]*)?/job/[^/?#[:space:]]+/[^/?#[:space:]]+/[^/?#[:space:]]+/?'' uri
    != null;

  # A positive systemd time span (systemd.time(7)) on one line: "300", "5min",
  # "1h 30min". systemd ignores any other OnUnitInactiveSec=, and the timer would
  # then only fire at boot.
  timeSpanIsValid =
    span:
    builtins.match " *([0-9.]+ *(usec|us|µs|msec|ms|seconds|second|sec|s|minutes|minute|min|m|hours|hour|hr|h|days|day|d|weeks|week|w|months|month|M|years|year|y)? *)+" span
    != null
    && builtins.match ".*[1-9].*" span != null;

  # A unit name's instance part: hail@<name>.service. Keep to characters that need no
  # systemd-escape(1) treatment, so that `systemctl start hail@<name>` just works.
  instanceNameIsValid = name: builtins.match "[A-Za-z0-9_.:-]+" name != null;

  # The enabled instances that deploy the system, as option paths' last part.
  systemInstanceNames = map lib.strings.escapeNixIdentifier (
    lib.attrNames (lib.filterAttrs (_: isSystemInstance) enabledInstances)
  );

  duplicateProfileFix =
    profile:
    if profile == systemProfile then
      "a host runs one NixOS system, from one Hydra job. Keep one instance with profile = \"${systemProfile}\" and disable or remove the others."
    else
      "give each its own services.hail.instances.<name>.profile, or disable all but one.";

  profilesUsedTwice = lib.filterAttrs (_: names: lib.length names > 1) (
    lib.groupBy' (names: name: names ++ [ name ]) [ ] (name: enabledInstances.${name}.profile) (
      lib.attrNames enabledInstances
    )
  );

  instanceAssertions =
    name: instance:
    let
      option = "services.hail.instances.${lib.strings.escapeNixIdentifier name}";
      clashing = lib.filter (variable: lib.hasAttr variable instance.environment) (
        lib.attrNames reservedVariables
      );
      systemOptions = systemOptionsSet instance;
      instead =
        variable:
        let
          replacement = reservedVariables.${variable};
        in
        if lib.hasPrefix "." replacement then option + replacement else replacement;
    in
    [
      {
        assertion = instanceNameIsValid name;
        message = ''
          ${option}: the instance name "${name}" becomes the systemd unit hail@${name}.service,
          so it may only contain letters, digits and "_.:-". Rename the instance; the name of
          the deployed profile can still be anything valid, set with ${option}.profile.
        '';
      }
      {
        assertion = profileNameIsValid instance.profile;
        message = ''
          ${option}.profile = "${instance.profile}" is not a valid profile name. Use a path
          relative to the profiles directory ${cfg.profilesDir}, made of letters, digits
          and "._+-", with "/" only between non-empty components other than "." and "..",
          for example "web" or "hail-profiles/web".
        '';
      }
      {
        assertion = jobUriIsValid instance.jobUri;
        message = ''
          ${option}.jobUri = "${instance.jobUri}" is not a Hydra job URL. Use
          http(s)://HYDRA[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB, for example
          "https://hydra.example.org/job/infra/main/web": without "/latest" (hail asks
          for <jobUri>/latest itself), without a query or fragment, and without
          credentials (put them in a netrc file and set ${option}.netrcFile).
        '';
      }
      {
        assertion = timeSpanIsValid instance.pollPeriod;
        message = ''
          ${option}.pollPeriod = "${instance.pollPeriod}" is not a positive systemd time
          span; use one such as "30s", "5min" or "1h 30min" (see systemd.time(7)). systemd
          would ignore it, and the timer would poll only at boot.
        '';
      }
      {
        assertion = clashing == [ ];
        message = ''
          ${option}.environment sets ${lib.concatStringsSep ", " clashing}, which options
          set: use ${lib.concatMapStringsSep ", " instead clashing} instead.
        '';
      }
      {
        assertion = isSystemInstance instance || systemOptions == [ ];
        message = ''
          ${option} sets ${lib.concatStringsSep ", " systemOptions}, which only
          an instance deploying a NixOS system uses (profile = "${systemProfile}"). This one
          deploys the profile "${instance.profile}", which hail activates with its bin/activate:
          remove them, or, if its job builds a whole NixOS system
          (config.system.build.toplevel), set ${option}.profile = "${systemProfile}".
        '';
      }
      {
        assertion = instance.rebootWindow == null || instance.allowReboot;
        message = ''
          ${option}.rebootWindow is set, but hail reboots only with
          ${option}.allowReboot = true. Set that to reboot into a new kernel inside
          the window, or remove rebootWindow (hail then switches and reports "reboot required").
        '';
      }
      {
        assertion =
          instance.rebootWindow == null || instance.rebootWindow.lower != instance.rebootWindow.upper;
        message = ''
          ${option}.rebootWindow is empty (lower = upper = "${instance.rebootWindow.lower}").
          Give the window a length, for example { lower = "02:00"; upper = "04:00"; }, or set
          it to null to reboot at any time.
        '';
      }
      {
        assertion = !isSystemInstance instance || cfg.profilesDir == nixosProfilesDir;
        message = ''
          ${option}.profile = "${systemProfile}" deploys to ${cfg.profilesDir}/${systemProfile}, but
          NixOS boots only the generations of ${nixosProfilesDir}/${systemProfile}. On a host
          hail deploys whole, leave services.hail.profilesDir at "${nixosProfilesDir}"; keep the
          other instances' profiles apart with their own profile option (e.g. "hail-profiles/web").
        '';
      }
    ];

  instanceOptions =
    { name, config, ... }:
    {
      options = {
        enable = lib.mkEnableOption "this hail instance" // {
          default = true;
          example = false;
          description = ''
            Whether to keep this instance's profile deployed. A disabled instance has
            no timer, no pass and no boot-time activation, and its other options are
            not checked.

            Disabling an instance is how to take it down: the switch that disables it
            runs its profile's `bin/deactivate` (through
            `hail-removed-instances.service`), which stops what the profile's
            `bin/activate` set up. The profile itself and its generations stay. Once
            that switch is done, the instance can be removed from
            {option}`services.hail.instances`. Removing an instance outright works
            the same as long as other instances remain; removing the last one
            outright leaves its profile up, because nothing of hail's is left in the
            system to take it down (see {option}`services.hail.instances`).
          '';
        };

        profile = lib.mkOption {
          type = lib.types.str;
          default = name;
          defaultText = lib.literalMD "the instance's name, `<name>`";
          example = "hail-profiles/web";
          description = ''
            The Nix profile this instance deploys to, relative to
            {option}`services.hail.profilesDir` (`/nix/var/nix/profiles` by
            default): `"web"` means `/nix/var/nix/profiles/web`, with its
            generations `/nix/var/nix/profiles/web-<N>-link`. It may contain `/` to
            keep hail's profiles in a subdirectory (`"hail-profiles/web"`). Two
            enabled instances cannot deploy the same profile.

            The profile is an ordinary `nix-env` profile: `nix-env -p
            /nix/var/nix/profiles/web --list-generations` shows what hail deployed,
            and `--rollback` goes back by hand.
          '';
        };

        jobUri = lib.mkOption {
          type = lib.types.str;
          example = "https://hydra.example.org/job/infra/main/web";
          description = ''
            The Hydra job to deploy: `http(s)://HYDRA[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB`.
            On every pass hail asks for `<jobUri>/latest`, which Hydra redirects to the
            newest successful build of the job, and deploys that build's `out` output.
            Required; there is no default.

            The build's output must be available to Nix on this machine: add the
            Hydra's binary cache and its public key to
            {option}`nix.settings.substituters` and
            {option}`nix.settings.trusted-public-keys`.
          '';
        };

        netrcFile = lib.mkOption {
          type = lib.types.nullOr externalPath;
          default = null;
          example = "/run/secrets/hydra-netrc";
          description = ''
            A netrc file with the credentials for a Hydra behind HTTP Basic
            authentication (`machine hydra.example.org login deploy password …`), read by
            hail for its Hydra requests (`HAIL_NETRC_FILE`). Give a path outside the Nix
            store, for example a file managed by sops-nix or agenix; it is read at run
            time by root. `null` (the default) sends no credentials.

            Nix reads its own netrc for the binary cache: set
            {option}`nix.settings.netrc-file` too when the cache needs the same
            credentials.
          '';
        };

        environmentFile = lib.mkOption {
          type = lib.types.nullOr externalPath;
          default = null;
          example = "/run/secrets/hail-web.env";
          description = ''
            A file of environment variables for this instance's pass and boot-time
            activation, in the format of systemd's `EnvironmentFile=` (see
            {manpage}`systemd.exec(5)`): one `NAME=value` per line. It is for
            secrets, which {option}`services.hail.instances.<name>.environment` would
            put into the world-readable
            Nix store: for example `NIX_CONFIG=access-tokens = github.com=…`, or
            `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` for a binary cache in
            S3. Give a path outside the store, such as a file managed by sops-nix or
            agenix; `null` (the default) reads none.

            systemd reads it, as root, every time `hail@<name>.service` or
            `hail-activate@<name>.service` starts (it becomes `EnvironmentFile=` of
            both drop-ins): a change takes effect at the next pass, and a missing file
            fails the unit. Its variables win over
            {option}`services.hail.instances.<name>.environment` and over those the
            other options set. hail does not hand them on to the transient unit that
            runs the profile's `bin/activate` (whose environment any local user can
            read): an activation inherits only `PATH`, the locale and `HAIL_*`.
          '';
        };

        pollPeriod = lib.mkOption {
          type = lib.types.nonEmptyStr;
          default = "5min";
          example = "1h";
          description = ''
            How long to wait after a pass has finished before the next one starts, as a
            systemd time span (`"30s"`, `"5min"`, `"1h 30min"`; see
            {manpage}`systemd.time(7)`). It becomes `OnUnitInactiveSec=` of
            `hail@<name>.timer`. The first pass runs one minute after boot, or at
            once when the timer is started later (e.g. by the switch that adds the
            instance).
          '';
        };

        randomizedDelay = lib.mkOption {
          type = lib.types.str;
          default = "1min";
          example = "10min";
          description = ''
            A random extra delay, up to this systemd time span, added to every timer
            expiry (`RandomizedDelaySec=`), so that a fleet of machines does not poll
            Hydra at the same moment. `"0"` disables it.
          '';
        };

        activateAtBoot = lib.mkOption {
          type = lib.types.bool;
          default = config.profile != systemProfile;
          defaultText = lib.literalExpression ''profile != "${systemProfile}"'';
          example = false;
          description = ''
            Whether to run the deployed profile's `bin/activate` again at every boot,
            through `hail-activate@<name>.service` (wanted by `multi-user.target`), so
            that what the profile sets up at activation (services it starts, files it
            writes to `/run`) comes back after a reboot without waiting for a deployment.
            When the profile does not exist yet, the unit does nothing and succeeds.
            The unit also runs when a switch adds the instance. Without it,
            `systemctl start hail-activate@<name>` still activates the profile by hand.

            Off for the profile `"system"`: NixOS activates the system it boots
            itself, and `hail activate` does nothing for it.
          '';
        };

        operation = lib.mkOption {
          type = lib.types.enum [
            "switch"
            "boot"
          ];
          default = systemDefaults.operation;
          example = "boot";
          description = ''
            Only for {option}`services.hail.instances.<name>.profile` = `"system"`.
            What the new system's `bin/switch-to-configuration` does once hail has
            made it the profile's new generation, as with
            {option}`system.autoUpgrade.operation`: `"switch"` activates it now and
            makes it the boot default (`nixos-rebuild switch`); `"boot"` only makes it
            the boot default, and it runs from the next reboot, whoever does that
            (`nixos-rebuild boot`). It becomes `HAIL_NIXOS_OPERATION`.

            With {option}`services.hail.instances.<name>.allowReboot` hail decides
            instead, per system: `boot` and a reboot when it needs one, `switch`
            otherwise.
          '';
        };

        confirmTimeout = lib.mkOption {
          type = lib.types.ints.between 0 86400;
          default = systemDefaults.confirmTimeout;
          example = 300;
          description = ''
            Only for {option}`services.hail.instances.<name>.profile` = `"system"`.
            After a successful `switch` (not after a `boot`, which leaves the running
            system as it is), how many seconds hail keeps asking the Hydra
            job (its `<jobUri>/latest`, every 2 s) before it decides that the new
            system cut the host off and rolls it back: the previous generation is
            switched to again, the new one deleted, and its build not deployed again
            while it is the job's latest. `0` does not check. It becomes
            `HAIL_CONFIRM_TIMEOUT`.

            Give a new network configuration the time it needs to come up (DHCP, a
            VPN). The pass's backstop,
            `systemd.services."hail@<name>".serviceConfig.TimeoutStartSec` (4 h),
            must stay above it plus the switch.
          '';
        };

        allowReboot = lib.mkOption {
          type = lib.types.bool;
          default = false;
          example = true;
          description = ''
            Only for {option}`services.hail.instances.<name>.profile` = `"system"`.
            Reboot the host into a new system whose kernel, initrd or kernel modules
            differ from the booted system's, as {option}`system.autoUpgrade.allowReboot`
            does: hail runs `switch-to-configuration boot`, then `systemctl reboot`
            (inside {option}`services.hail.instances.<name>.rebootWindow`, if set).
            A system that needs no reboot is switched to (`switch`, whatever
            {option}`services.hail.instances.<name>.operation` says). hail reboots
            once per system: a host that comes back running another one (chosen in
            the boot menu) is not rebooted again for it, and *reboot required* is
            reported instead. It becomes
            `HAIL_ALLOW_REBOOT`.

            Without it hail switches to such a system too (the new kernel waits
            for the next reboot) and reports *reboot required* in its log,
            `hail status` and the metrics.
          '';
        };

        rebootWindow = lib.mkOption {
          type = lib.types.nullOr (
            lib.types.submodule {
              options = {
                lower = lib.mkOption {
                  type = timeOfDay;
                  example = "01:00";
                  description = "Start of the reboot window, local time (HH:MM).";
                };
                upper = lib.mkOption {
                  type = timeOfDay;
                  example = "05:00";
                  description = "End of the reboot window, local time (HH:MM), not included.";
                };
              };
            }
          );
          default = null;
          example = {
            lower = "01:00";
            upper = "05:00";
          };
          description = ''
            Only with {option}`services.hail.instances.<name>.allowReboot`. The
            local times between which hail may reboot the host, as
            {option}`system.autoUpgrade.rebootWindow`; a window whose `upper` comes
            before its `lower` wraps midnight (`23:00` to `04:00`). Outside it a
            system that needs a reboot waits as the boot default, *reboot pending*,
            and the first pass inside the window reboots: make
            {option}`services.hail.instances.<name>.pollPeriod` shorter than the
            window. `null` (the default) reboots at any time. It becomes
            `HAIL_REBOOT_WINDOW=<lower>-<upper>`.
          '';
        };

        keepGenerations = lib.mkOption {
          type = lib.types.nullOr lib.types.ints.positive;
          default = null;
          example = 5;
          description = ''
            After a successful deploy, delete all but the newest this many generations
            of the profile (`--keep-generations`), never the current one. `null` keeps
            every generation (then `nix-collect-garbage --delete-older-than` or
            `nix.gc` decides).
          '';
        };

        onFailure = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
          example = [ "notify-admins@%n.service" ];
          description = ''
            Units to start when a pass fails (systemd `OnFailure=`), for example a
            template unit that mails or posts to a webhook. A pass fails when hail
            exits non-zero: Hydra or nix failed (exit status 1), or an activation
            failed and was rolled back (exit status 3). `journalctl -u hail@<name>`
            has the reason; `hail status` summarises it.
          '';
        };

        extraArgs = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
          example = [
            "--timeout"
            "600"
          ];
          description = ''
            Extra command-line arguments for each pass:
            `hail --oneshot <extraArgs…>`. They are quoted for systemd, one argument
            per list element. Prefer the options above (and `environment`, e.g.
            `HAIL_TIMEOUT`) where one exists.
          '';
        };

        environment = lib.mkOption {
          type = lib.types.attrsOf lib.types.str;
          default = { };
          example = {
            HAIL_TIMEOUT = "600";
            NIX_CONFIG = "connect-timeout = 5";
          };
          description = ''
            Extra environment variables for the pass (and for the boot-time activation),
            for example `HAIL_TIMEOUT` or `NIX_CONFIG`. Variables that options set
            (${lib.concatMapStringsSep ", " (variable: "`${variable}`") (lib.attrNames reservedVariables)})
            cannot be set here. The values end up in the
            world-readable unit files in the Nix store: put secrets into
            {option}`services.hail.instances.<name>.environmentFile` instead.

            hail bounds every step of a pass itself: `HAIL_LOCK_TIMEOUT` (waiting for
            another pass, default 1800 s), `HAIL_TIMEOUT` (each Hydra exchange, 60 s),
            `HAIL_NIX_TIMEOUT` (each `nix-env` call, such as a substitution, 1800 s)
            and `HAIL_ACTIVATE_TIMEOUT` (`bin/activate`, 600 s); each is at most
            86400 s. The unit's `TimeoutStartSec` (4 h) is a backstop above their
            worst case at the defaults: raise it with
            `systemd.services."hail@<name>".serviceConfig.TimeoutStartSec` if you
            raise them.
          '';
        };
      };
    };
in
{
  options.services.hail = {
    package = lib.mkOption {
      type = lib.types.package;
      # nixpkgs has no hail package, and `pkgs.hail` is not used as the default on
      # purpose: an unrelated package of that name (nixpkgs had one until 2023) would be
      # picked up silently. The flake's nixosModules.default sets this with mkDefault to
      # the flake's own build for the host; anyone importing this file directly sets it.
      default = throw ''
        services.hail.package is not set. Import the module from hail's flake
        (inputs.hail.nixosModules.default), which sets it to hail's own build, or set
        services.hail.package yourself, e.g. to pkgs.hail after adding hail's
        overlays.default to nixpkgs.overlays.
      '';
      defaultText = lib.literalMD ''
        `hail.packages.''${system}.hail` when the module comes from hail's flake
        (`nixosModules.default`); no default otherwise
      '';
      example = lib.literalExpression "pkgs.hail";
      description = ''
        The hail package to run. Its `bin/hail` runs every pass and every boot-time
        activation.
      '';
    };

    profilesDir = lib.mkOption {
      type = externalPath;
      default = "/nix/var/nix/profiles";
      example = "/nix/var/nix/profiles/hail";
      description = ''
        The directory the instances' profiles live in: the profile of an instance
        is `<profilesDir>/<profile>` (see
        {option}`services.hail.instances.<name>.profile`). It becomes
        `HAIL_PROFILES_DIR` of every hail unit, and
        `hail-removed-instances.service` looks there for the `bin/deactivate` of
        removed instances' profiles. An absolute path of letters, digits and
        `._+-/`, outside the Nix store.

        Changing it does not move profiles that already exist: their instances
        deploy into a new, empty profile at the next pass, and what the old one set
        up is not taken down. Nix keeps a profile's generations alive (as garbage
        collector roots) wherever the profile is.
      '';
    };

    stateDir = lib.mkOption {
      type = externalPath;
      default = "/var/lib/hail";
      example = "/srv/hail";
      description = ''
        Where hail keeps its state: per-profile state files (`<profile>.json`, what
        `hail status` shows), the locks that keep passes of one profile apart, and
        the list of instances `hail-removed-instances.service` compares with. It
        becomes `HAIL_STATE_DIR` of every hail unit. A directory under `/var/lib`
        is created by systemd as the units' `StateDirectory=`; any other by
        systemd-tmpfiles (mode 0755, owned by root). An absolute path of letters,
        digits and `._+-/`, outside the Nix store.

        `hail status` run by hand reads `/var/lib/hail` unless told otherwise:
        with another directory, run `hail status --state-dir <stateDir>` (or set
        `HAIL_STATE_DIR`). Changing it does not move the state: hail starts afresh
        in the new directory, forgetting the builds whose activation failed (it
        tries them again) and any rollback by hand it was holding off for.
      '';
    };

    metricsDir = lib.mkOption {
      type = lib.types.nullOr externalPath;
      default = null;
      example = "/var/lib/prometheus-node-exporter-text-files";
      description = ''
        Where each pass writes Prometheus metrics for its instance, as
        `hail-<name>.prom` (atomically): point it at node_exporter's textfile
        collector directory (`services.prometheus.exporters.node.extraFlags =
        [ "--collector.textfile.directory=…" ]`). The directory must exist. The
        series (`hail_up_to_date`, `hail_last_success_timestamp_seconds`,
        `hail_deployed_build_id`, `hail_rollbacks_total`,
        `hail_errors_total{kind=…}`, …) are listed in hail's documentation.
        `null` (the default) writes none.
      '';
    };

    instances = lib.mkOption {
      type = lib.types.attrsOf (lib.types.submodule instanceOptions);
      default = { };
      example = lib.literalExpression ''
        {
          web.jobUri = "https://hydra.example.org/job/infra/main/web";
          db = {
            profile = "hail-profiles/db";
            jobUri = "https://hydra.example.org/job/infra/main/db";
            netrcFile = "/run/secrets/hydra-netrc";
            environmentFile = "/run/secrets/hail-db.env";
            pollPeriod = "1h";
            activateAtBoot = false;
          };
        }
      '';
      description = ''
        The profiles to keep deployed, one Hydra job each; empty by default, and
        then the module adds nothing to the system. The instance's name is the
        systemd instance: `hail@<name>.timer` starts `hail@<name>.service` every
        {option}`services.hail.instances.<name>.pollPeriod`, one pass of
        `hail --oneshot`, which deploys the job's newest successful build into the
        profile and runs its `bin/activate`; `hail-activate@<name>.service` runs
        `bin/activate` again at boot. Both are drop-ins for the templates
        `hail@.service` and `hail-activate@.service`, which run sandboxed (the
        profile's `bin/activate` runs in a transient unit of its own,
        `hail-activation-<profile>.service`, outside that sandbox).

        Run a pass now with `systemctl start hail@<name>`; its log is in
        `journalctl -u hail@<name>`. A NixOS switch never interrupts a running pass.

        While any instance is defined, enabled or not,
        `hail-removed-instances.service` remembers the enabled instances' profiles
        (in `<stateDir>/nixos-instances`); at every switch and boot it runs
        `bin/deactivate` of each remembered profile whose instance is no longer
        enabled. To take an instance down, disable it
        ({option}`services.hail.instances.<name>.enable` = `false`), switch, then
        remove it. Removing the last instance outright leaves its profile up, as
        that switch removes the unit as well; its `bin/deactivate` then runs only
        if instances are defined again later.
      '';
    };
  };

  config = lib.mkIf (cfg.instances != { }) (
    lib.mkMerge [
      {
        assertions = [
          {
            assertion = directoryIsValid cfg.profilesDir;
            message = ''
              services.hail.profilesDir = "${cfg.profilesDir}" is not a usable directory.
              Use an absolute path made of letters, digits and "._+-", with "/" only
              between non-empty components other than "." and ".." (no "/" at the end),
              for example "/nix/var/nix/profiles/hail".
            '';
          }
          {
            assertion = directoryIsValid cfg.stateDir;
            message = ''
              services.hail.stateDir = "${cfg.stateDir}" is not a usable directory. Use
              an absolute path made of letters, digits and "._+-", with "/" only between
              non-empty components other than "." and ".." (no "/" at the end), for
              example "/var/lib/hail".
            '';
          }
        ];

        systemd.tmpfiles.rules = lib.mkIf (stateDirectoryName == null) [
          "d ${cfg.stateDir} 0755 root root -"
        ];

        # Takes down instances that were removed or disabled: their timers and boot
        # units go with the configuration, and this runs their profiles'
        # bin/deactivate. It remembers the enabled instances' profiles in
        # <stateDir>/nixos-instances; its script embeds the current list, so a switch
        # that changes the list restarts it, and it runs
        # <profilesDir>/PROFILE/bin/deactivate for every profile that was on the
        # remembered list and is not on the current one. A deactivate that fails is
        # reported (the unit fails) and retried at the next switch or boot. It
        # exists while any instance is defined, disabled ones included: disabling
        # the last instance takes it down, removing it outright cannot (the
        # `instances` option's description says so).
        systemd.services.hail-removed-instances = {
          description = "hail: take down the profiles of removed instances";
          documentation = [ "https://github.com/hail-cd/hail" ];
          wantedBy = [ "multi-user.target" ];
          # The switch does not stop a pass that is running (X-StopOnRemoval=false on
          # hail@), and this does not wait for one: a pass of a removed instance that
          # ends after this ran may activate its profile once more (rare; run the
          # profile's bin/deactivate by hand then).
          after = [ "local-fs.target" ];
          # deactivate scripts run systemctl (a service profile's `hail service
          # deactivate`), and a manager profile's finds its instances' profiles in
          # HAIL_PROFILES_DIR.
          path = [ config.systemd.package ];
          environment = directoriesEnvironment;
          # No sandbox: it runs the profiles' bin/deactivate itself, and those may do
          # anything an activation does.
          serviceConfig = stateDirectoryConfig // {
            Type = "oneshot";
            RemainAfterExit = true;
            UMask = "0022";
            # A backstop: each bin/deactivate has 10 minutes (as hail gives one).
            TimeoutStartSec = "1h";
          };
          script = ''
            list=${lib.escapeShellArg instancesList}
            current=${lib.escapeShellArg (lib.concatMapStrings (profile: profile + "\n") currentProfiles)}
            keep=
            failed=0
            if [ -f "$list" ]; then
              while IFS= read -r profile; do
                [ -n "$profile" ] || continue
                if printf '%s' "$current" | grep -qxF -- "$profile"; then continue; fi
                deactivate=${lib.escapeShellArg cfg.profilesDir}/$profile/bin/deactivate
                if [ ! -e "$deactivate" ]; then
                  echo "profile $profile was removed; it has no bin/deactivate"
                  continue
                fi
                echo "profile $profile was removed; running $deactivate"
                if ! timeout --kill-after=10s 600s "$deactivate" </dev/null; then
                  echo "$deactivate failed; trying again at the next switch or boot" >&2
                  keep="$keep$profile
            "
                  failed=1
                fi
              done < "$list"
            fi
            if [ -z "$current$keep" ]; then
              rm -f "$list"
            else
              # A new file of a random name, not one a link may wait at.
              tmp=$(mktemp "$list.XXXXXXXX")
              printf '%s%s' "$current" "$keep" > "$tmp"
              mv -f "$tmp" "$list"
            fi
            exit "$failed"
          '';
        };
      }
      (lib.mkIf (enabledInstances != { }) {
        assertions =
          lib.concatLists (lib.mapAttrsToList instanceAssertions enabledInstances)
          ++ lib.mapAttrsToList (profile: names: {
            assertion = false;
            message = ''
              services.hail.instances.{${lib.concatStringsSep ", " names}} all deploy the profile
              "${profile}". Two instances would fight over it: ${duplicateProfileFix profile}
            '';
          }) profilesUsedTwice
          ++ map (name: {
            assertion = !config.system.autoUpgrade.enable;
            message = ''
              services.hail.instances.${name} deploys this host's NixOS system, and
              system.autoUpgrade.enable is true: both would switch the system, each undoing
              the other. Set system.autoUpgrade.enable = false; the instance's operation,
              allowReboot and rebootWindow options do what autoUpgrade's did.
            '';
          }) systemInstanceNames;

        systemd.services = lib.mkMerge [
          {
            # The pass template. Instances only add a drop-in (below); the template
            # alone, started as hail@foo, deploys profile "foo" if the environment
            # provides HAIL_JOB_URI (it does not: instances are the supported way).
            "hail@" = {
              description = "hail: deploy Nix profile %i from Hydra";
              documentation = [ "https://github.com/hail-cd/hail" ];
              wants = [ "network-online.target" ];
              after = [ "network-online.target" ];

              # nix-env, the same Nix as the system's; systemd-run and journalctl, with
              # which hail runs bin/activate in a transient unit of its own (NixOS puts
              # systemd on every service's path anyway; hail depends on it, so say so).
              path = hailPath;

              # HAIL_PROFILE is overridden by every instance's drop-in; %i is the
              # instance name as typed (%I would unescape "my-web" into "my/web").
              environment = directoriesEnvironment // {
                HAIL_PROFILE = "%i";
              };

              # A NixOS switch must never restart (= kill) a running pass: the pass may
              # be in the middle of switching the profile or running bin/activate, and
              # the switch itself may be what bin/activate runs. The next timer run
              # picks up the new unit. Same reasoning as system.autoUpgrade's
              # nixos-upgrade.service.
              restartIfChanged = false;
              # ...and removing an instance does not stop a pass that is running.
              unitConfig.X-StopOnRemoval = false;

              serviceConfig = hardening // stateDirectoryConfig // {
                Type = "oneshot";
                # Nothing else here: instances replace ExecStart= to add extraArgs.
                ExecStart = "${hail} --oneshot";
                # `systemctl stop` ends a pass with SIGTERM: the operator's choice, not
                # a failure (an activation under way goes on in its own transient unit).
                SuccessExitStatus = "SIGTERM";
                # hail reports its step with sd_notify(STATUS=...) for `systemctl
                # status`; a oneshot unit ignores notifications unless allowed.
                NotifyAccess = "main";
                # A backstop above hail's own deadlines, which bound every step of a
                # pass. At the defaults the worst case is about 3.2 h: the lock wait
                # (HAIL_LOCK_TIMEOUT, 30 min), Hydra exchanges (HAIL_TIMEOUT, 1 min
                # each), four nix calls (HAIL_NIX_TIMEOUT, 30 min each: the realise and
                # the switch, and on a rollback the switch back and the deletion), two
                # activations (HAIL_ACTIVATE_TIMEOUT, 10 min each, plus waiting for an
                # earlier one) and a system's check that Hydra still answers
                # (confirmTimeout, 1 min). Raise it with them.
                TimeoutStartSec = lib.mkDefault "4h";
                UMask = "0022";
              };
            };

            # Boot-time activation template: runs PROFILE/bin/activate when the profile
            # exists, succeeds doing nothing otherwise.
            "hail-activate@" = {
              description = "hail: activate deployed Nix profile %i at boot";
              documentation = [ "https://github.com/hail-cd/hail" ];
              after = [
                "local-fs.target"
                "nix-daemon.socket"
              ];
              # A pass of the same instance started at boot waits for the activation.
              before = [ "hail@%i.service" ];
              path = hailPath;
              environment = directoriesEnvironment // {
                HAIL_PROFILE = "%i";
              };
              # A switch must not re-run activations (the unit stays active after boot).
              restartIfChanged = false;
              serviceConfig = hardening // stateDirectoryConfig // {
                Type = "oneshot";
                RemainAfterExit = true;
                ExecStart = "${hail} activate";
                # Above hail's own deadlines: the lock wait and activate.
                TimeoutStartSec = lib.mkDefault "1h";
                NotifyAccess = "main";
                UMask = "0022";
              };
            };
          }

          (lib.mapAttrs' (
            name: instance:
            lib.nameValuePair "hail@${name}" (instanceDropin instance // {
              environment =
                (instanceDropin instance).environment
                // lib.optionalAttrs (instance.netrcFile != null) {
                  HAIL_NETRC_FILE = instance.netrcFile;
                }
                // lib.optionalAttrs (instance.keepGenerations != null) {
                  HAIL_KEEP_GENERATIONS = toString instance.keepGenerations;
                }
                // lib.optionalAttrs (cfg.metricsDir != null) {
                  HAIL_METRICS_FILE = "${cfg.metricsDir}/hail-${name}.prom";
                }
                // lib.optionalAttrs (isSystemInstance instance) (systemEnvironment instance)
                // instance.environment;
              onFailure = instance.onFailure;
              serviceConfig =
                # ExecStart= accumulates in drop-ins of oneshot units: "" resets the
                # template's line, then the one command follows.
                lib.optionalAttrs (instance.extraArgs != [ ]) {
                  ExecStart = [
                    ""
                    "${hail} --oneshot ${escapeSystemdExecArgs instance.extraArgs}"
                  ];
                }
                // environmentFileConfig instance;
            })
          ) enabledInstances)

          # Every instance gets the drop-in, so that `systemctl start hail-activate@<name>`
          # activates the right profile; only activateAtBoot makes boot start it.
          (lib.mapAttrs' (
            name: instance:
            lib.nameValuePair "hail-activate@${name}" (instanceDropin instance // {
              environment = (instanceDropin instance).environment // instance.environment;
              serviceConfig = environmentFileConfig instance;
              wantedBy = lib.optional instance.activateAtBoot "multi-user.target";
            })
          ) enabledInstances)
        ];

        # Full timer units (there is no hail@.timer template on NixOS); hail@<name>.timer
        # starts hail@<name>.service by name.
        systemd.timers = lib.mapAttrs' (
          name: instance:
          lib.nameValuePair "hail@${name}" {
            description = "hail: poll Hydra for Nix profile ${instance.profile}";
            documentation = [ "https://github.com/hail-cd/hail" ];
            wantedBy = [ "timers.target" ];
            timerConfig = {
              # First pass one minute after boot; a timer started later (by the switch
              # that adds the instance) that never ran fires at once.
              OnBootSec = "1min";
              # Then pollPeriod after the previous pass finished, so passes never
              # overlap and a slow pass pushes the next one back.
              OnUnitInactiveSec = instance.pollPeriod;
              RandomizedDelaySec = instance.randomizedDelay;
              # Only affects OnCalendar= (which a user may add): a calendar expiry
              # missed while the machine was off runs at boot. Harmless for the
              # monotonic settings above.
              Persistent = true;
            };
          }
        ) enabledInstances;
      })
    ]
  );
}
