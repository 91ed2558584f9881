# nixpkgs' trivial builders, the few that nix/lib and examples/ use, made with
# `builtins.derivation` and the host's /bin/sh as the only builder tool (nixpkgs
# cannot build anything on these test machines; see profile.nix). Same calling
# conventions as nixpkgs: runCommand NAME ENV SCRIPT, writeText NAME TEXT,
# writeScript NAME TEXT, writeShellScript NAME TEXT (here with #!/bin/sh, where
# nixpkgs uses bash). Build with BUILDER_NIX_CONFIG (tests/integration/common/cache.rs):
# a sandbox that sees /bin, /lib, /lib64 and /usr.
#
# `lib` is nixpkgs' lib when the caller has one (NIXPKGS_LIB), else absent.
{
  lib ? null,
}:
let
  build =
    name: env: script:
    derivation (
      {
        inherit name;
        system = builtins.currentSystem;
        builder = "/bin/sh";
        PATH = "/bin:/usr/bin";
        args = [
          "-c"
          ("set -eu\n" + script)
        ];
      }
      // env
    );

  writeScript =
    name: text:
    build name {
      inherit text;
      passAsFile = [ "text" ];
    } ''cp "$textPath" "$out"; chmod +x "$out"'';
in
{
  runCommand = build;
  writeText =
    name: text:
    build name {
      inherit text;
      passAsFile = [ "text" ];
    } ''cp "$textPath" "$out"'';
  inherit writeScript;
  writeShellScript = name: text: writeScript name "#!/bin/sh\n${text}";
}
// (if lib == null then { } else { inherit lib; })
