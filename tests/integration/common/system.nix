# A NixOS-like system for the tests (systems::, systemd::): `nixos-version`,
# `bin/switch-to-configuration` read from the file `switch`, and `kernel`,
# `initrd` and `kernel-modules` links into store paths of their own, the same
# for the same `kernel` in one world (`world` tells test worlds apart, each
# of which substitutes its own; `nonce` makes two builds of a label differ).
{ label, kernel, switch, world ? "", nonce ? "" }:
let
  drv = name: script: env: derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/bin:/usr/bin";
    args = [ "-c" ("set -eu\n" + script) ];
  } // env);
  boot = file: drv "${file}-${kernel}" "mkdir $out; echo ${kernel} > $out/${file}" { inherit world; };
  bzImage = boot "bzImage";
  initrd = boot "initrd";
  modules = drv "kernel-modules-${kernel}" "mkdir -p $out/lib/modules/${kernel}" { inherit world; };
in
drv "nixos-system-${label}" ''
  mkdir -p $out/bin
  echo 26.05 > $out/nixos-version
  printf '%s' "$switch" > $out/bin/switch-to-configuration
  chmod +x $out/bin/switch-to-configuration
  ln -s ${bzImage}/bzImage $out/kernel
  ln -s ${initrd}/initrd $out/initrd
  ln -s ${modules} $out/kernel-modules
  printf '%s\n' "$nonce" > $out/nonce
'' { switch = builtins.readFile switch; inherit nonce; }
