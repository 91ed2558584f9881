{
  description = "hail: pull-based continuous deployment of Nix profiles from Hydra";

  # nixos-26.05 ships rustc 1.95, at or above Cargo.toml's rust-version.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);

      # Only what cargo needs, so that editing the module, the units or the docs does
      # not rebuild the package. (lib.cleanSourceWith rather than lib.fileset: the
      # latter needs builtins.readFileType, which older Nix such as 2.8 lacks.)
      src = lib.cleanSourceWith {
        name = "hail-source";
        src = ./.;
        filter =
          path: type:
          let
            relative = lib.removePrefix (toString ./. + "/") (toString path);
          in
          lib.elem relative [
            "Cargo.toml"
            "Cargo.lock"
            "src"
            "tests"
          ]
          || lib.hasPrefix "src/" relative
          || lib.hasPrefix "tests/" relative;
      };

      # callPackage-style, shared by packages and overlays.default.
      hailPackage =
        {
          lib,
          rustPlatform,
          stdenv,
          installShellFiles,
        }:
        rustPlatform.buildRustPackage {
          pname = "hail";
          inherit (cargoToml.package) version;
          inherit src;

          cargoLock.lockFile = ./Cargo.lock;

          nativeBuildInputs = [ installShellFiles ];

          # The integration tests (one test binary, tests/integration/main.rs) need a
          # real Nix store, loopback HTTP servers, systemd or nixpkgs' lib: none of that
          # exists in the build sandbox. Their names start with their module, which is
          # how they are skipped here; they run in CI and on developer machines.
          checkFlags = map (area: "--skip=${area}::") [
            "pass"
            "faults"
            "files"
            "front"
            "messages"
            "bounded"
            "observe"
            "systemd"
            "services"
            "systems"
            "nixos"
            "nixlib"
            "units"
            "bench"
            "docs"
          ];
          # `--skip` matches substrings of test names in every test binary, so the run
          # above also skips unit tests in src/ whose module path contains one of those
          # words (src/pass.rs's tests are named `pass::tests::…`). Run the unit tests
          # of the library and the binaries once more, unfiltered, with the same
          # profile and target as cargoCheckHook (everything is built already).
          postCheck = ''
            unitTestTargets=(--bins)
            if [ -e src/lib.rs ]; then unitTestTargets+=(--lib); fi
            cargoProfileFlag=()
            if [ "''${cargoCheckType:-release}" != debug ]; then
              cargoProfileFlag=(--profile "''${cargoCheckType:-release}")
            fi
            (
              set -x
              cargo test -j "$NIX_BUILD_CORES" "''${cargoProfileFlag[@]}" \
                --target ${stdenv.hostPlatform.rust.rustcTargetSpec} \
                --offline "''${unitTestTargets[@]}" -- --test-threads="$NIX_BUILD_CORES"
            )
          '';

          # The man pages and shell completions in docs/, generated from the clap
          # definition and kept current by the docs:: tests. Only those files, so that
          # editing the rest of docs/ does not rebuild the package.
          postInstall =
            let
              generated = lib.cleanSourceWith {
                name = "hail-generated-docs";
                src = ./docs;
                filter =
                  path: type:
                  let
                    relative = lib.removePrefix (toString ./docs + "/") (toString path);
                  in
                  type == "directory"
                  || lib.hasSuffix ".1" relative
                  || lib.hasPrefix "completions/" relative;
              };
            in
            ''
              installManPage ${generated}/*.1
              installShellCompletion --cmd hail \
                --bash ${generated}/completions/hail.bash \
                --zsh ${generated}/completions/_hail \
                --fish ${generated}/completions/hail.fish
            '';

          meta = {
            inherit (cargoToml.package) description;
            homepage = cargoToml.package.repository;
            license = lib.licenses.mit;
            mainProgram = "hail";
            platforms = lib.platforms.linux;
          };
        };
    in
    {
      packages = forAllSystems (
        system: pkgs: {
          hail = pkgs.callPackage hailPackage { };
          default = self.packages.${system}.hail;
        }
      );

      # `nix run .#hail -- --oneshot --profile web --job-uri …`
      apps = forAllSystems (
        system: _: {
          hail = {
            type = "app";
            program = lib.getExe self.packages.${system}.hail;
            meta.description = "Run one hail pass (or `hail activate`)";
          };
          default = self.apps.${system}.hail;
        }
      );

      overlays.default = final: _prev: {
        hail = final.callPackage hailPackage { };
      };

      nixosModules = {
        # The module, with services.hail.package defaulting to this flake's build for
        # the host (nixos/module.nix alone has no default package).
        hail =
          { lib, pkgs, ... }:
          {
            imports = [ ./nixos/module.nix ];
            services.hail.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.hail;
          };
        default = self.nixosModules.hail;
      };

      checks = forAllSystems (
        system: pkgs:
        let
          moduleEval = import ./nixos/tests/eval.nix { inherit lib; };
        in
        {
          # Builds and runs the tests that need no host (the unit tests).
          hail = self.packages.${system}.hail;

          # The module against stand-in NixOS options (nixos/tests/eval.nix); fails when
          # the evaluation fails or an expectation does not hold.
          module-eval =
            pkgs.runCommand "hail-module-eval"
              {
                passAsFile = [ "cases" ];
                cases = builtins.toJSON moduleEval.cases;
                failed = toString moduleEval.failedExpectations;
              }
              ''
                if [ -n "$failed" ]; then
                  echo "nixos/tests/eval.nix: failed expectations: $failed" >&2
                  exit 1
                fi
                cp "$casesPath" "$out"
              '';

          # The module inside a real NixOS evaluation: the generated unit files.
          module-units =
            let
              nixos = nixpkgs.lib.nixosSystem {
                modules = [
                  self.nixosModules.default
                  {
                    nixpkgs.hostPlatform = system;
                    boot.isContainer = true;
                    system.stateVersion = "26.05";
                    services.hail.instances = {
                      web.jobUri = "https://hydra.example.org/job/infra/main/web";
                      db = {
                        profile = "hail-profiles/db";
                        jobUri = "https://hydra.example.org/job/infra/main/db";
                        netrcFile = "/run/secrets/hydra-netrc";
                        extraArgs = [
                          "--timeout"
                          "600"
                        ];
                        activateAtBoot = false;
                      };
                    };
                  }
                ];
              };
              units = nixos.config.systemd.units;
              names = [
                "hail@.service"
                "hail@web.service"
                "hail@db.service"
                "hail@web.timer"
                "hail@db.timer"
                "hail-activate@.service"
                "hail-activate@web.service"
              ];
            in
            pkgs.writeText "hail-module-units" (
              lib.concatMapStrings (name: "### ${name}\n${units.${name}.text}\n") names
            );

          # A NixOS VM deploying from a Hydra stand-in: needs KVM and a full nixpkgs.
          vm = import ./nixos/tests/vm.nix {
            inherit pkgs;
            hailModule = self.nixosModules.default;
          };

          # A whole NixOS host (profile "system") switched by hail from a Hydra stand-in,
          # and two broken systems rolled back: needs KVM and a full nixpkgs.
          vm-system = import ./nixos/tests/vm-system.nix {
            inherit pkgs;
            hailModule = self.nixosModules.default;
          };
        }
      );

      devShells = forAllSystems (
        _: pkgs: {
          default = pkgs.mkShell {
            packages = [
              pkgs.cargo
              pkgs.rustc
              pkgs.clippy
              pkgs.rustfmt
              pkgs.nix
              # systemd-analyze, for the units:: tests
              pkgs.systemd
            ];
            # nixpkgs' lib for the nixos:: tests (nixos/tests/eval.nix).
            NIXPKGS_LIB = "${nixpkgs}/lib";
          };
        }
      );

      formatter = forAllSystems (_: pkgs: pkgs.nixfmt);

      # For flakes that deploy with hail: lib.mkServiceProfile, lib.mkManagerProfile
      # (nix/lib), and lib.mkBlueGreenProfile (examples/blue-green).
      lib =
        import ./nix/lib {
          hail = pkgs: self.packages.${pkgs.stdenv.hostPlatform.system}.hail;
        }
        // {
          mkBlueGreenProfile = import ./examples/blue-green;
        };
    };
}
