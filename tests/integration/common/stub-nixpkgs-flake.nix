# flake.nix of a stand-in for nixpkgs: the real nixpkgs lib (copied beside it
# by nixos::flake_outputs_evaluate_against_a_stub_nixpkgs from NIXPKGS_LIB) and
# fake packages, so that hail's flake outputs can be evaluated offline with
# `--override-input nixpkgs path:DIR` (Nix 2.8, no nixpkgs tree here).
{
  outputs = { self }:
    let
      lib = import ./lib;
      mkPkgs = system:
        let
          drv = name: attrs: derivation ({ inherit name system; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; } // attrs);
          pkgs = {
            inherit lib;
            stdenv.hostPlatform = { inherit system; rust.rustcTargetSpec = "${system}-unknown-linux-gnu"; };
            callPackage = f: extra: f (builtins.intersectAttrs (builtins.functionArgs f) (pkgs // extra));
            rustPlatform.buildRustPackage = args: drv "${args.pname}-${args.version}" {
              src = args.src;
              passthru_checkFlags = args.checkFlags;
              postCheck = args.postCheck;
              postInstall = args.postInstall;
              nativeBuildInputs = args.nativeBuildInputs;
              cargoLockFile = args.cargoLock.lockFile;
            } // { inherit (args) meta; passthru = args; };
            runCommand = name: env: cmd: drv name (builtins.removeAttrs env [ "passAsFile" ] // { cmd = cmd; });
            writeText = name: text: drv name { inherit text; };
            mkShell = args: drv "shell" { NIXPKGS_LIB = args.NIXPKGS_LIB; };
            testers.runNixOSTest = args: drv "vm-test-run-${args.name}" { };
            installShellFiles = drv "install-shell-files" {};
            cargo = drv "cargo" {}; rustc = drv "rustc" {}; clippy = drv "clippy" {}; rustfmt = drv "rustfmt" {}; nix = drv "nix" {}; systemd = drv "systemd" {}; nixfmt = drv "nixfmt" {};
          };
        in pkgs;
    in {
      lib = lib // { nixosSystem = args: throw "stub nixpkgs: no nixosSystem"; };
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] mkPkgs;
    };
}
