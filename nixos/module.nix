# NixOS module for hail: pull-based continuous deployment of Nix profiles from Hydra.
#
# One instance (`services.hail.instances.<name>`) is one profile kept up to date with
# one Hydra job. Every instance becomes three systemd units built from two templates:
#
#   hail@<name>.service           one pass: ask Hydra for the job's latest build,
#                                 substitute it, switch the profile, run bin/activate
#   hail@<name>.timer             runs the pass every `pollPeriod`
#   hail-activate@<name>.service  at boot, runs the profile's bin/activate again
#                                 (when `activateAtBoot`)
#
# The module has no `services.hail.enable`: it is active as soon as one instance is
# enabled. Defining no instance (or only disabled ones) adds one unit only,
# hail-removed-instances.service, which does nothing on a machine that never had an
# instance: it is what takes down the profiles of instances that disappeared.
#
# Style: no `with lib;`; the same conventions as nixpkgs' system.autoUpgrade module.
{ config, lib, ... }:

let
  cfg = config.services.hail;

  enabledInstances = lib.filterAttrs (_: instance: instance.enable) cfg.instances;

  # What hail-removed-instances.service compares with the profiles it remembers.
  currentProfiles = lib.unique (lib.mapAttrsToList (_: instance: instance.profile) enabledInstances);

  hail = "${cfg.package}/bin/hail";

  # On the PATH of every hail unit: nix-env, the same Nix as the system's, and
  # systemd-run/journalctl, with which hail runs bin/activate in a transient unit.
  # Drop-ins repeat it: NixOS writes a PATH= line into each, which replaces the
  # template's.
  hailPath = [
    config.nix.package
    config.systemd.package
  ];

  # Quoting for one word of a systemd ExecStart= line. This is what nixpkgs'
  # `utils.escapeSystemdExecArg` does, inlined so the module needs no `utils` argument.
  # `lib.escapeShellArgs` is not enough: systemd does accept a whole word in single
  # quotes ('--timeout' '600'), but it does not know the shell's `'\''` trick, it
  # still expands `%` specifiers and `$VAR` inside quotes, and it unescapes C escapes
  # there. A JSON string is a double-quoted word with C escapes, which systemd reads
  # back verbatim once `%` and `$` are doubled.
  escapeSystemdExecArg = arg: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg);
  escapeSystemdExecArgs = args: lib.concatMapStringsSep " " escapeSystemdExecArg args;

  # The variables the options below set; `environment` must not set them as well.
  reservedVariables = [
    "HAIL_PROFILE"
    "HAIL_JOB_URI"
    "HAIL_NETRC_FILE"
  ];

  # A profile name, relative to the profiles directory (/nix/var/nix/profiles):
  # `web` or `hail-profiles/web`. The same rules as hail's own `--profile` check.
  profileNameIsValid =
    profile:
    builtins.match "[A-Za-z0-9._+/-]+" profile != null
    && !(lib.hasPrefix "/" profile)
    && lib.all (component: component != "" && component != "." && component != "..") (
      lib.splitString "/" profile
    );

  # https?://HOST[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB[/]. No user:password@ (that
  # goes into netrcFile), no query, no fragment, and not the `…/latest` URL: hail
  # appends `/latest` itself. (POSIX ERE as builtins.match takes it: a literal [ or ]
  # is written [[] or []], a backslash escape is not portable.)
  jobUriIsValid =
    uri:
    builtins.match ''https?://([[][0-9A-Fa-f:.]+[]]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[^?#[:space:]]*)?/job/[^/?#[:space:]]+/[^/?#[:space:]]+/[^/?#[:space:]]+/?'' uri
    != null;

  # A unit name's instance part: hail@<name>.service. Keep to characters that need no
  # systemd-escape(1) treatment, so that `systemctl start hail@<name>` just works.
  instanceNameIsValid = name: builtins.match "[A-Za-z0-9_.:-]+" name != null;

  profilesUsedTwice = lib.filterAttrs (_: names: lib.length names > 1) (
    lib.groupBy' (names: name: names ++ [ name ]) [ ] (name: enabledInstances.${name}.profile) (
      lib.attrNames enabledInstances
    )
  );

  instanceAssertions =
    name: instance:
    let
      option = "services.hail.instances.${lib.strings.escapeNixIdentifier name}";
      clashing = lib.filter (variable: lib.hasAttr variable instance.environment) reservedVariables;
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
          relative to the profiles directory /nix/var/nix/profiles, made of letters, digits
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
        assertion = clashing == [ ];
        message = ''
          ${option}.environment sets ${lib.concatStringsSep ", " clashing}, which the
          instance's own options set. Use ${option}.profile, .jobUri and .netrcFile instead.
        '';
      }
    ];

  instanceOptions =
    { name, ... }:
    {
      options = {
        enable = lib.mkEnableOption "this hail instance" // {
          default = true;
          example = false;
          description = ''
            Whether to keep this instance's profile deployed. A disabled instance
            generates no units at all and is not validated. Disabling an instance, like
            removing it, takes down what its profile set up: the switch runs the
            profile's `bin/deactivate` (see `hail-removed-instances.service`). The
            profile itself and its generations stay.
          '';
        };

        profile = lib.mkOption {
          type = lib.types.str;
          default = name;
          defaultText = lib.literalMD "the instance's name, `<name>`";
          example = "hail-profiles/web";
          description = ''
            The Nix profile this instance deploys to, relative to the profiles
            directory `/nix/var/nix/profiles`: `"web"` means
            `/nix/var/nix/profiles/web`, with its generations
            `/nix/var/nix/profiles/web-<N>-link`. It may contain `/` to keep hail's
            profiles in a subdirectory (`"hail-profiles/web"`). Two enabled
            instances cannot deploy the same profile.

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
          # pathWith { inStore = false; }: a string path outside the store. A Nix path
          # literal (./netrc) would copy the credentials into the world-readable store,
          # so the type refuses one. (types.pathWith is in nixpkgs 25.05 and later.)
          type = lib.types.nullOr (
            lib.types.pathWith {
              inStore = false;
              absolute = true;
            }
          );
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
          default = true;
          example = false;
          description = ''
            Whether to run the deployed profile's `bin/activate` again at every boot,
            through `hail-activate@<name>.service` (wanted by `multi-user.target`), so
            that what the profile sets up at activation (services it starts, files it
            writes to `/run`) comes back after a reboot without waiting for a deployment.
            When the profile does not exist yet, the unit does nothing and succeeds.
            The unit also runs when a switch adds the instance. Without it,
            `systemctl start hail-activate@<name>` still activates the profile by hand.
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
            for example `HAIL_TIMEOUT` or `NIX_CONFIG`. `HAIL_PROFILE`, `HAIL_JOB_URI`
            and `HAIL_NETRC_FILE` come from the options above and cannot be set here.
            The values end up in the world-readable unit files in the Nix store: no
            secrets.

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

    metricsDir = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/var/lib/prometheus-node-exporter-text-files";
      description = ''
        Where each pass writes Prometheus metrics for its instance, as
        `hail-<name>.prom` (atomically): point it at node_exporter's textfile
        collector directory (`services.prometheus.exporters.node.extraFlags =
        [ "--collector.textfile.directory=…" ]`). The series (`hail_up_to_date`,
        `hail_last_success_timestamp_seconds`, `hail_deployed_build_id`,
        `hail_rollbacks_total`, `hail_errors_total{kind=…}`, …) are listed in hail's
        README. `null` writes none.
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
            pollPeriod = "1h";
            activateAtBoot = false;
          };
        }
      '';
      description = ''
        The profiles to keep deployed, one Hydra job each. The instance's name is the
        systemd instance: `hail@<name>.timer` polls every {option}`pollPeriod` and
        starts `hail@<name>.service`, one pass of `hail --oneshot`, which deploys the
        job's newest successful build into the profile and runs its `bin/activate`;
        `hail-activate@<name>.service` runs `bin/activate` again at boot.

        Run a pass now with `systemctl start hail@<name>`; its log is in
        `journalctl -u hail@<name>`. A NixOS switch never interrupts a running pass.
        Defining at least one enabled instance is what enables the module.
      '';
    };
  };

  config = lib.mkMerge [
  {
    # Instances that disappear (removed, or disabled): their timers and boot units go
    # with the configuration, and this takes down what their profiles set up. It
    # remembers the enabled instances' profiles in /var/lib/hail/nixos-instances; its
    # script embeds the current list, so a switch that changes the list restarts it,
    # and it runs `/nix/var/nix/profiles/PROFILE/bin/deactivate` for every profile
    # that was on the remembered list and is not on the current one. A deactivate
    # that fails is reported (the unit fails) and retried at the next switch or boot.
    # It stays in the system when the last instance goes, so that the last one is
    # taken down too; it does nothing on a machine that never had an instance.
    systemd.services.hail-removed-instances = {
      description = "hail: take down the profiles of removed instances";
      documentation = [ "https://github.com/hail-cd/hail" ];
      wantedBy = [ "multi-user.target" ];
      # The switch does not stop a pass that is running (X-StopOnRemoval=false on
      # hail@), and this does not wait for one: a pass of a removed instance that
      # ends after this ran may activate its profile once more (rare; run the
      # profile's bin/deactivate by hand then).
      after = [ "local-fs.target" ];
      # deactivate scripts run systemctl (a service profile's `hail service deactivate`).
      path = [ config.systemd.package ];
      unitConfig.ConditionPathExists = lib.mkIf (enabledInstances == { }) "/var/lib/hail/nixos-instances";
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        StateDirectory = "hail";
        UMask = "0022";
      };
      script = ''
        list=/var/lib/hail/nixos-instances
        current=${lib.escapeShellArg (lib.concatMapStrings (profile: profile + "\n") currentProfiles)}
        keep=
        failed=0
        if [ -f "$list" ]; then
          while IFS= read -r profile; do
            [ -n "$profile" ] || continue
            if printf '%s' "$current" | grep -qxF -- "$profile"; then continue; fi
            deactivate=/nix/var/nix/profiles/$profile/bin/deactivate
            if [ ! -e "$deactivate" ]; then
              echo "profile $profile was removed; it has no bin/deactivate"
              continue
            fi
            echo "profile $profile was removed; running $deactivate"
            if ! "$deactivate" </dev/null; then
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
          printf '%s%s' "$current" "$keep" > "$list.tmp"
          mv -f "$list.tmp" "$list"
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
          "${profile}". Two instances would fight over it: give each its own
          services.hail.instances.<name>.profile, or disable all but one.
        '';
      }) profilesUsedTwice;

    systemd.services = lib.mkMerge [
      {
        # The pass template. Instances only add a drop-in (below); the template alone,
        # started as hail@foo, deploys profile "foo" if the environment provides
        # HAIL_JOB_URI (it does not: instances are the supported way).
        "hail@" = {
          description = "hail: deploy Nix profile %i from Hydra";
          documentation = [ "https://github.com/hail-cd/hail" ];
          wants = [ "network-online.target" ];
          after = [ "network-online.target" ];

          # nix-env, the same Nix as the system's; systemd-run and journalctl, with
          # which hail runs bin/activate in a transient unit of its own (NixOS puts
          # systemd on every service's path anyway; hail depends on it, so say so).
          path = hailPath;

          # Overridden by every instance's drop-in; %i is the instance name as
          # typed (%I would unescape "my-web" into "my/web").
          environment.HAIL_PROFILE = "%i";

          # A NixOS switch must never restart (= kill) a running pass: the pass may be
          # in the middle of switching the profile or running bin/activate, and the
          # switch itself may be what bin/activate runs. The next timer run picks up the
          # new unit. Same reasoning as system.autoUpgrade's nixos-upgrade.service.
          restartIfChanged = false;
          # ...and removing an instance does not stop a pass that is running.
          unitConfig.X-StopOnRemoval = false;

          serviceConfig = {
            Type = "oneshot";
            # Nothing else here: instances replace ExecStart= to add extraArgs.
            ExecStart = "${hail} --oneshot";
            # `systemctl stop` ends a pass with SIGTERM: the operator's choice, not a
            # failure (an activation under way goes on in its own transient unit).
            SuccessExitStatus = "SIGTERM";
            # hail reports its step with sd_notify(STATUS=...) for `systemctl status`;
            # a oneshot unit ignores notifications unless allowed.
            NotifyAccess = "main";
            # /var/lib/hail, exported as $STATE_DIRECTORY, hail's default state dir.
            StateDirectory = "hail";
            # A backstop above hail's own deadlines, which bound every step of a
            # pass. At the defaults the worst case is about 3 h: the lock wait
            # (HAIL_LOCK_TIMEOUT, 30 min), Hydra exchanges (HAIL_TIMEOUT, 1 min each),
            # three nix-env calls (HAIL_NIX_TIMEOUT, 30 min each: the switch, and on
            # a rollback the switch back and the deletion) and two activations
            # (HAIL_ACTIVATE_TIMEOUT, 10 min each). Raise it with them.
            TimeoutStartSec = lib.mkDefault "4h";

            # Hardening: none beyond a plain umask, on purpose. What hail@ may do by
            # design is run arbitrary code as root: it switches root-owned profiles
            # (nix-env writes /nix/var/nix and, as root with the local store, the store
            # itself, remounting it writable in a mount namespace of its own) and it asks
            # PID 1, through systemd-run, to run the profile's bin/activate in a
            # transient unit (hail-activation-<profile>.service) that none of this
            # unit's settings reach. A sandbox around the pass therefore protects
            # nothing an attacker controlling the pass could not undo through
            # systemd-run or a profile, while each setting risks breaking the pass
            # itself or the fallback where bin/activate runs as a direct child (no
            # systemd-run on PATH), where it would confine the activation:
            # - ProtectSystem=, ReadOnlyPaths=, RestrictNamespaces=: nix-env's store
            #   remount and its writes to /nix/var/nix; activations write /etc, /var...
            # - ProtectHome=: Nix keeps its narinfo cache in root's ~/.cache/nix.
            # - PrivateTmp=: a fallback activation may leave files in /tmp for others.
            # - NoNewPrivileges=, RestrictSUIDSGID=, CapabilityBoundingSet=: break
            #   fallback activations that use sudo, setuid wrappers or setcap.
            # - PrivateDevices=, ProtectKernel*=, ProtectControlGroups=, ProtectClock=,
            #   ProtectHostname=, MemoryDenyWriteExecute=, SystemCallFilter=: the same,
            #   for activations that touch devices, modules, sysctls, cgroups, the clock
            #   or the hostname, or run JIT runtimes.
            # - PrivateNetwork=, IPAddressDeny=: the pass talks to Hydra and the caches.
            # The trust boundary is elsewhere: who may publish to the Hydra job, and
            # the cache's signing key in nix.settings.trusted-public-keys.
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
          environment.HAIL_PROFILE = "%i";
          # A switch must not re-run activations (the unit stays active after boot).
          restartIfChanged = false;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${hail} activate";
            # Above hail's own deadlines: the lock wait and activate.
            TimeoutStartSec = lib.mkDefault "1h";
            NotifyAccess = "main";
            StateDirectory = "hail";
            UMask = "0022";
            # No sandboxing, for the same reasons as hail@ above.
          };
        };
      }

      (lib.mapAttrs' (
        name: instance:
        lib.nameValuePair "hail@${name}" {
          # A drop-in (hail@<name>.service.d/overrides.conf) for the template, not a
          # unit file of its own.
          overrideStrategy = "asDropin";
          # NixOS writes a PATH= line into every service it generates, drop-ins too,
          # made from the unit's `path` plus coreutils & co. Without this the drop-in's
          # PATH would replace the template's and lose nix-env.
          path = hailPath;
          restartIfChanged = false;
          environment = {
            HAIL_PROFILE = instance.profile;
            HAIL_JOB_URI = instance.jobUri;
          }
          // lib.optionalAttrs (instance.netrcFile != null) {
            HAIL_NETRC_FILE = toString instance.netrcFile;
          }
          // lib.optionalAttrs (instance.keepGenerations != null) {
            HAIL_KEEP_GENERATIONS = toString instance.keepGenerations;
          }
          // lib.optionalAttrs (cfg.metricsDir != null) {
            HAIL_METRICS_FILE = "${toString cfg.metricsDir}/hail-${name}.prom";
          }
          // instance.environment;
          onFailure = instance.onFailure;
          # ExecStart= accumulates in drop-ins of oneshot units: "" resets the
          # template's line, then the one command follows.
          serviceConfig = lib.mkIf (instance.extraArgs != [ ]) {
            ExecStart = [
              ""
              "${hail} --oneshot ${escapeSystemdExecArgs instance.extraArgs}"
            ];
          };
        }
      ) enabledInstances)

      # Every instance gets the drop-in, so that `systemctl start hail-activate@<name>`
      # activates the right profile; only activateAtBoot makes boot start it.
      (lib.mapAttrs' (
        name: instance:
        lib.nameValuePair "hail-activate@${name}" {
          overrideStrategy = "asDropin";
          path = hailPath;
          restartIfChanged = false;
          # The same profile and job as hail@<name>: hail activate refuses a profile
          # deployed from another job, and records a failure for the passes to retry.
          environment = {
            HAIL_PROFILE = instance.profile;
            HAIL_JOB_URI = instance.jobUri;
          }
          // instance.environment;
          wantedBy = lib.optional instance.activateAtBoot "multi-user.target";
        }
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
          # Then pollPeriod after the previous pass finished, so passes never overlap
          # and a slow pass pushes the next one back.
          OnUnitInactiveSec = instance.pollPeriod;
          RandomizedDelaySec = instance.randomizedDelay;
          # Only affects OnCalendar= (which a user may add): a calendar expiry missed
          # while the machine was off runs at boot. Harmless for the monotonic
          # settings above.
          Persistent = true;
        };
      }
    ) enabledInstances;
  })
  ];
}
