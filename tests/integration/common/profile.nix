# A deployable test profile, built for real in a separate (chroot) store so
# that hail's pass has to substitute it from the binary cache. The builder is
# the host's /bin/sh (made visible through sandbox-paths): nixpkgs is not
# available here, and input-addressed outputs like this one need signatures,
# as Hydra's do.
{
  label,
  nonce,
  activate,
  deactivate ? "",
}:
derivation {
  name = "hail-test-${label}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  inherit nonce activate deactivate;
  args = [
    "-c"
    ''
      mkdir -p $out/bin
      printf '%s' "$activate" > $out/bin/activate
      chmod +x $out/bin/activate
      if [ -n "$deactivate" ]; then
        printf '%s' "$deactivate" > $out/bin/deactivate
        chmod +x $out/bin/deactivate
      fi
      printf '%s\n' "$nonce" > $out/nonce
    ''
  ];
}
