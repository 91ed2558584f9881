# Evaluation test for nixos/module.nix, without a NixOS system and without nixpkgs'
# packages: only nixpkgs' `lib` (lib.evalModules and the option types).
#
# The module is evaluated together with small stand-ins for the NixOS options it uses
# (systemd.services, systemd.timers, systemd.tmpfiles.rules, systemd.package, assertions,
# nix.package, system.autoUpgrade.enable), typed like
# NixOS's own so that a misspelt option or a wrong type fails here too, for
# configurations whose outcome is known. Run it with
#
#   nix-instantiate --eval --strict --json nixos/tests/eval.nix \
#     --arg lib 'import /path/to/nixpkgs/lib' -A cases
#
# `cases` is what tests/integration/nixos.rs checks in detail; `expectations` is the
# same checks' gist in Nix, used by the flake's `checks.<system>.module-eval`.
# `missingJobUri`, `noPackage`, `secretInStore` and `badRebootTime` must fail to
# evaluate (with the option's name in the error); evaluate them separately.
{ lib }:

let
  inherit (lib) mkOption types;

  fakePackage = hash: name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${hash}-${name}";
  };
  fakeHail = fakePackage "0000000000000000000000000000000a" "hail-0.1.0";
  fakeNix = fakePackage "0000000000000000000000000000000b" "nix-2.31.0";
  fakeCoreutils = fakePackage "0000000000000000000000000000000c" "coreutils-9.7";
  fakeSystemd = fakePackage "0000000000000000000000000000000d" "systemd-258";

  # ---- Stand-ins for the NixOS options the module touches -------------------------
  # Shaped after nixos/lib/systemd-unit-options.nix and systemd-lib.nix: the same
  # option names, types and defaults for the parts hail uses, and no freeform
  # attributes, so an option NixOS does not have is an error here as well.
  unitName = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](device|mount|automount|swap|target|path|timer|socket|service|slice|scope)";
  unitSettings = types.attrsOf (
    types.oneOf [
      types.bool
      types.int
      types.str
      (types.listOf types.str)
    ]
  );
  unitList = mkOption {
    type = types.listOf unitName;
    default = [ ];
  };

  commonUnit = {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      overrideStrategy = mkOption {
        type = types.enum [
          "asDropinIfExists"
          "asDropin"
        ];
        default = "asDropinIfExists";
      };
      description = mkOption {
        type = types.singleLineStr;
        default = "";
      };
      documentation = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wantedBy = unitList;
      requiredBy = unitList;
      onFailure = unitList;
      wants = unitList;
      requires = unitList;
      after = unitList;
      before = unitList;
      unitConfig = mkOption {
        type = unitSettings;
        default = { };
      };
    };
  };

  serviceUnit =
    { config, ... }:
    {
      imports = [ commonUnit ];
      options = {
        restartIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        path = mkOption {
          type = types.listOf (
            types.oneOf [
              types.package
              types.str
            ]
          );
          default = [ ];
        };
        environment = mkOption {
          type = types.attrsOf (
            types.nullOr (
              types.oneOf [
                types.str
                types.path
                types.package
              ]
            )
          );
          default = { };
        };
        serviceConfig = mkOption {
          type = unitSettings;
          default = { };
        };
        script = mkOption {
          type = types.lines;
          default = "";
        };
      };
      # What NixOS does to every stage-2 service, template drop-ins included: a minimal
      # default path, and a PATH= line made from `path`.
      config = {
        path = lib.mkAfter [ fakeCoreutils ];
        environment.PATH = lib.mkIf (config.path != [ ]) (lib.makeBinPath config.path);
      };
    };

  timerUnit = {
    imports = [ commonUnit ];
    options.timerConfig = mkOption {
      type = unitSettings;
      default = { };
    };
  };

  nixosStubs = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      nix.package = mkOption {
        type = types.package;
        default = fakeNix;
      };
      systemd.package = mkOption {
        type = types.package;
        default = fakeSystemd;
      };
      systemd.services = mkOption {
        type = types.attrsOf (types.submodule serviceUnit);
        default = { };
      };
      systemd.timers = mkOption {
        type = types.attrsOf (types.submodule timerUnit);
        default = { };
      };
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      system.autoUpgrade.enable = mkOption {
        type = types.bool;
        default = false;
      };
    };
  };

  # ---- Evaluation ------------------------------------------------------------------
  evalWith =
    config:
    (lib.evalModules {
      modules = [
        nixosStubs
        ../module.nix
        config
      ];
    }).config;

  # services.hail = hail, with the fake package.
  evalHail = hail: evalWith { services.hail = { package = fakeHail; } // hail; };

  summarize = config: {
    services = config.systemd.services;
    timers = config.systemd.timers;
    tmpfiles = config.systemd.tmpfiles.rules;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  };

  jobUri = job: "https://hydra.example.org/job/infra/main/${job}";

  # A whole NixOS host deployed from the job hosts.web1.
  systemInstance =
    settings:
    {
      profile = "system";
      jobUri = jobUri "hosts.web1";
    }
    // settings;

  # Each case is a services.hail configuration (autoUpgradeToo: with system.autoUpgrade).
  cases = lib.mapAttrs (_: hail: summarize (evalHail hail)) {
    good.instances = {
      web = {
        jobUri = jobUri "web";
        netrcFile = "/run/secrets/hydra-netrc";
        environmentFile = "/run/secrets/hail-web.env";
        environment.NIX_CONFIG = "connect-timeout = 5";
        keepGenerations = 5;
        onFailure = [ "notify-admins@%n.service" ];
      };
      db = {
        profile = "hail-profiles/db";
        jobUri = "http://hydra.internal:3000/hydra/job/infra/main/db/";
        pollPeriod = "1h";
        randomizedDelay = "10min";
        activateAtBoot = false;
        extraArgs = [
          "--timeout"
          "600"
        ];
      };
      # Arguments systemd would mangle if they were shell-quoted: %, $, quotes, space.
      odd-args = {
        jobUri = "https://[2001:db8::1]:8443/job/infra/main/odd";
        extraArgs = [
          "--state-dir"
          "/srv/hail 100% \"$HOME\" it's"
        ];
      };
      # Disabled instances generate nothing and are not validated.
      retired = {
        enable = false;
        profile = "web";
        jobUri = "not a url";
      };
    };

    empty = { };

    onlyDisabled.instances.old = {
      enable = false;
      jobUri = "https://hydra.example.org/job/infra/main/old";
    };

    # Both directories moved; the state directory still under /var/lib.
    customDirs = {
      profilesDir = "/nix/var/nix/profiles/hail";
      stateDir = "/var/lib/hail-deploy";
      metricsDir = "/var/lib/prometheus-node-exporter-text-files";
      instances.web.jobUri = jobUri "web";
      instances.retired = {
        enable = false;
        jobUri = jobUri "retired";
      };
    };

    # A state directory StateDirectory= cannot express.
    stateOutsideVarLib = {
      stateDir = "/srv/hail/state";
      instances.web.jobUri = jobUri "web";
    };

    badDirs = {
      profilesDir = "/nix/var/nix/profiles/";
      stateDir = "/var/lib/my hail";
      instances.web.jobUri = jobUri "web";
    };

    duplicateProfile.instances = {
      web.jobUri = jobUri "web";
      web-canary = {
        profile = "web";
        jobUri = jobUri "web-canary";
      };
      db.jobUri = jobUri "db";
    };

    badJobUri.instances = {
      no-scheme.jobUri = "hydra.example.org/job/infra/main/web";
      latest.jobUri = "https://hydra.example.org/job/infra/main/web/latest";
      credentials.jobUri = "https://deploy:secret@hydra.example.org/job/infra/main/web";
      jobset.jobUri = "https://hydra.example.org/jobset/infra/main";
      query.jobUri = "https://hydra.example.org/job/infra/main/web?x=1";
    };

    badProfile.instances = {
      absolute = {
        profile = "/nix/var/nix/profiles/web";
        jobUri = jobUri "a";
      };
      dotdot = {
        profile = "hail/../web";
        jobUri = jobUri "b";
      };
      empty = {
        profile = "";
        jobUri = jobUri "c";
      };
      space = {
        profile = "my web";
        jobUri = jobUri "d";
      };
      double-slash = {
        profile = "hail//web";
        jobUri = jobUri "e";
      };
      trailing-slash = {
        profile = "web/";
        jobUri = jobUri "f";
      };
      dot = {
        profile = "./web";
        jobUri = jobUri "g";
      };
    };

    badInstanceName.instances = {
      "my web".jobUri = jobUri "web";
    };

    badPollPeriod.instances = {
      web = {
        jobUri = jobUri "web";
        pollPeriod = "5 parsecs";
      };
      db = {
        jobUri = jobUri "db";
        pollPeriod = "0";
      };
      ok = {
        jobUri = jobUri "ok";
        pollPeriod = "1h 30min";
      };
    };

    reservedEnvironment.instances.web = {
      jobUri = jobUri "web";
      environment.HAIL_JOB_URI = jobUri "other";
      environment.HAIL_STATE_DIR = "/srv/hail";
      environment.HAIL_ALLOW_REBOOT = "true";
    };

    # A host deployed whole, rebooting for new kernels at night, beside a profile.
    systemRebooting.instances = {
      system = systemInstance {
        allowReboot = true;
        rebootWindow = {
          lower = "23:30";
          upper = "04:00";
        };
        confirmTimeout = 300;
      };
      web.jobUri = jobUri "web";
    };

    # Only the profile decides: any instance name, and hail's defaults spelt out.
    systemDefaults.instances.host = systemInstance { };

    systemBoot.instances.host = systemInstance {
      operation = "boot";
      confirmTimeout = 0;
    };

    systemOptionsElsewhere.instances.web = {
      jobUri = jobUri "web";
      operation = "boot";
      confirmTimeout = 0;
      allowReboot = true;
      rebootWindow = {
        lower = "02:00";
        upper = "04:00";
      };
    };

    rebootWindowWithoutAllowReboot.instances.system = systemInstance {
      rebootWindow = {
        lower = "02:00";
        upper = "04:00";
      };
    };

    emptyRebootWindow.instances.system = systemInstance {
      allowReboot = true;
      rebootWindow = {
        lower = "03:00";
        upper = "03:00";
      };
    };

    twoSystemInstances.instances = {
      system = systemInstance { };
      system-canary = systemInstance { jobUri = jobUri "hosts.web1-canary"; };
    };

    systemOutsideNixosProfiles = {
      profilesDir = "/nix/var/nix/profiles/hail";
      instances.system = systemInstance { };
    };
  }
  // {
    autoUpgradeToo = summarize (evalWith {
      services.hail = {
        package = fakeHail;
        instances.system = systemInstance { };
      };
      system.autoUpgrade.enable = true;
    });

    # system.autoUpgrade with profiles only: nothing to fight over.
    autoUpgradeAndProfiles = summarize (evalWith {
      services.hail = {
        package = fakeHail;
        instances.web.jobUri = jobUri "web";
      };
      system.autoUpgrade.enable = true;
    });
  };

  # Must fail: jobUri has no default.
  missingJobUri = summarize (evalHail {
    instances.web.netrcFile = "/run/secrets/hydra-netrc";
  });

  # Must fail: a secret in the store is readable by every user.
  secretInStore = summarize (evalHail {
    instances.web = {
      jobUri = jobUri "web";
      environmentFile = "/nix/store/00000000000000000000000000000000-hail-web.env";
    };
  });

  # Must fail: 24:00 is no time of day (hail's --reboot-window would refuse it).
  badRebootTime = summarize (evalHail {
    instances.system = systemInstance {
      allowReboot = true;
      rebootWindow = {
        lower = "22:00";
        upper = "24:00";
      };
    };
  });

  # Must fail with the package option's own message: no services.hail.package.
  noPackage = summarize (evalWith {
    services.hail.instances.web.jobUri = jobUri "web";
  });

  fails = value: !(builtins.tryEval (builtins.deepSeq value value)).success;
  anyMessage = infix: messages: lib.any (lib.hasInfix infix) messages;

  good = cases.good;
  hail = "${fakeHail}/bin/hail";
  units = [
    "hail@"
    "hail-activate@"
  ];
  # What each of the two templates must say, for the given case.
  inTemplates = case: check: lib.all (unit: check case.services.${unit}) units;

  expectations = {
    goodHasNoFailedAssertions = good.failedAssertions == [ ];
    templateExecStart = good.services."hail@".serviceConfig.ExecStart == "${hail} --oneshot";
    templateNotifies = good.services."hail@".serviceConfig.NotifyAccess == "main";
    templateNotRestarted = !good.services."hail@".restartIfChanged;
    templateHasNix = lib.elem fakeNix good.services."hail@".path;
    dropInIsDropIn = good.services."hail@web".overrideStrategy == "asDropin";
    dropInEnvironment =
      good.services."hail@web".environment.HAIL_JOB_URI == jobUri "web"
      && good.services."hail@web".environment.HAIL_NETRC_FILE == "/run/secrets/hydra-netrc"
      && good.services."hail@db".environment.HAIL_PROFILE == "hail-profiles/db";
    templateHasSystemd = lib.elem fakeSystemd good.services."hail@".path;
    dropInKeepsNixOnPath = lib.hasInfix "${fakeNix}/bin" good.services."hail@web".environment.PATH;
    dropInKeepsSystemdOnPath = lib.hasInfix "${fakeSystemd}/bin" good.services."hail@web".environment.PATH;
    extraArgsReplaceExecStart =
      good.services."hail@db".serviceConfig.ExecStart == [
        ""
        "${hail} --oneshot \"--timeout\" \"600\""
      ];
    keepGenerationsAndOnFailure =
      good.services."hail@web".environment.HAIL_KEEP_GENERATIONS == "5"
      && good.services."hail@web".onFailure == [ "notify-admins@%n.service" ]
      && !(good.services."hail@db".environment ? HAIL_KEEP_GENERATIONS)
      && good.services."hail@db".onFailure == [ ];
    noExtraArgsNoExecStart = !(good.services."hail@web".serviceConfig ? ExecStart);
    timer =
      good.timers."hail@db".timerConfig.OnUnitInactiveSec == "1h"
      && good.timers."hail@db".timerConfig.RandomizedDelaySec == "10min"
      && good.timers."hail@db".wantedBy == [ "timers.target" ];
    bootActivationOnlyWhenWanted =
      good.services."hail-activate@web".wantedBy == [ "multi-user.target" ]
      && good.services."hail-activate@db".wantedBy == [ ]
      && good.services."hail-activate@db".environment.HAIL_PROFILE == "hail-profiles/db";
    environmentFileOnBothDropIns =
      good.services."hail@web".serviceConfig.EnvironmentFile == "/run/secrets/hail-web.env"
      && good.services."hail-activate@web".serviceConfig.EnvironmentFile == "/run/secrets/hail-web.env"
      && !(good.services."hail@db".serviceConfig ? EnvironmentFile)
      && !(good.services."hail-activate@db".serviceConfig ? EnvironmentFile);
    templatesHardened = inTemplates good (
      unit:
      unit.serviceConfig.NoNewPrivileges
      && unit.serviceConfig.PrivateTmp
      && unit.serviceConfig.RestrictAddressFamilies == [
        "AF_UNIX"
        "AF_INET"
        "AF_INET6"
      ]
    );
    removalUnitNotHardened =
      !(good.services.hail-removed-instances.serviceConfig ? NoNewPrivileges);
    # Only disabled instances: the unit that takes them down, nothing else.
    disabledGeneratesOnlyTheRemovalUnit =
      !(good.services ? "hail@retired")
      && lib.attrNames cases.onlyDisabled.services == [ "hail-removed-instances" ]
      && cases.onlyDisabled.timers == { };
    emptyGeneratesNothing =
      cases.empty.services == { }
      && cases.empty.timers == { }
      && cases.empty.tmpfiles == [ ]
      && cases.empty.failedAssertions == [ ];
    defaultDirectories =
      inTemplates good (
        unit:
        unit.environment.HAIL_PROFILES_DIR == "/nix/var/nix/profiles"
        && unit.environment.HAIL_STATE_DIR == "/var/lib/hail"
        && unit.serviceConfig.StateDirectory == "hail"
      )
      && good.tmpfiles == [ ];
    customDirectories =
      inTemplates cases.customDirs (
        unit:
        unit.environment.HAIL_PROFILES_DIR == "/nix/var/nix/profiles/hail"
        && unit.environment.HAIL_STATE_DIR == "/var/lib/hail-deploy"
        && unit.serviceConfig.StateDirectory == "hail-deploy"
      )
      && cases.customDirs.services.hail-removed-instances.serviceConfig.StateDirectory == "hail-deploy"
      && lib.hasInfix "/var/lib/hail-deploy/nixos-instances" cases.customDirs.services.hail-removed-instances.script
      && lib.hasInfix "/nix/var/nix/profiles/hail/$profile/bin/deactivate" cases.customDirs.services.hail-removed-instances.script
      && cases.customDirs.tmpfiles == [ ];
    stateOutsideVarLibUsesTmpfiles =
      inTemplates cases.stateOutsideVarLib (
        unit:
        unit.environment.HAIL_STATE_DIR == "/srv/hail/state" && !(unit.serviceConfig ? StateDirectory)
      )
      && !(cases.stateOutsideVarLib.services.hail-removed-instances.serviceConfig ? StateDirectory)
      && cases.stateOutsideVarLib.tmpfiles == [ "d /srv/hail/state 0755 root root -" ];
    badDirsFailEach = lib.length cases.badDirs.failedAssertions == 2;
    duplicateProfileFails = anyMessage "all deploy the profile" cases.duplicateProfile.failedAssertions;
    badJobUriFailsEach = lib.length cases.badJobUri.failedAssertions == 5;
    badProfileFailsEach = lib.length cases.badProfile.failedAssertions == 7;
    badInstanceNameFails = anyMessage "becomes the systemd unit" cases.badInstanceName.failedAssertions;
    reservedEnvironmentFails = anyMessage "HAIL_JOB_URI" cases.reservedEnvironment.failedAssertions;
    badPollPeriodFails = anyMessage "not a positive systemd time" cases.badPollPeriod.failedAssertions;
    systemEnvironment =
      cases.systemRebooting.services."hail@system".environment.HAIL_REBOOT_WINDOW == "23:30-04:00"
      && cases.systemRebooting.services."hail@system".environment.HAIL_ALLOW_REBOOT == "true"
      && cases.systemDefaults.services."hail@host".environment.HAIL_NIXOS_OPERATION == "switch"
      && cases.systemDefaults.services."hail@host".environment.HAIL_CONFIRM_TIMEOUT == "60"
      && cases.systemBoot.services."hail@host".environment.HAIL_NIXOS_OPERATION == "boot"
      && !(cases.systemRebooting.services."hail@web".environment ? HAIL_NIXOS_OPERATION);
    systemNotActivatedAtBoot =
      cases.systemRebooting.services."hail-activate@system".wantedBy == [ ]
      && cases.systemRebooting.services."hail-activate@web".wantedBy == [ "multi-user.target" ];
    systemCasesPass = lib.all (case: cases.${case}.failedAssertions == [ ]) [
      "systemRebooting"
      "systemDefaults"
      "systemBoot"
      "autoUpgradeAndProfiles"
    ];
    systemOptionsElsewhereFails =
      anyMessage "deploying a NixOS system uses" cases.systemOptionsElsewhere.failedAssertions;
    rebootWindowWithoutAllowRebootFails =
      anyMessage "hail reboots only with" cases.rebootWindowWithoutAllowReboot.failedAssertions;
    emptyRebootWindowFails = anyMessage "rebootWindow is empty" cases.emptyRebootWindow.failedAssertions;
    twoSystemInstancesFail =
      anyMessage "a host runs one NixOS system" cases.twoSystemInstances.failedAssertions;
    systemOutsideNixosProfilesFails =
      anyMessage "NixOS boots only the generations" cases.systemOutsideNixosProfiles.failedAssertions;
    autoUpgradeTooFails =
      anyMessage "system.autoUpgrade.enable = false" cases.autoUpgradeToo.failedAssertions;
    badRebootTimeFails = fails badRebootTime;
    missingJobUriFails = fails missingJobUri;
    noPackageFails = fails noPackage;
    secretInStoreFails = fails secretInStore;
  };
in
{
  inherit
    cases
    missingJobUri
    noPackage
    secretInStore
    badRebootTime
    expectations
    ;
  hailPackage = "${fakeHail}";
  nixPackage = "${fakeNix}";
  systemdPackage = "${fakeSystemd}";
  failedExpectations = lib.attrNames (lib.filterAttrs (_: ok: !ok) expectations);
}
