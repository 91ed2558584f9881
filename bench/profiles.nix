# bench/run's deployable profiles: N of them, each unique to this run (nonce),
# built like the integration tests' (tests/integration/common/profile.nix) with
# a trivial activate, in a chroot store so that deploying them substitutes
# them from the signed binary cache.
{ n, nonce }:
builtins.genList
  (i: import ../tests/integration/common/profile.nix {
    label = "bench-${toString i}";
    nonce = "${nonce}-${toString i}";
    activate = "#!/bin/sh\ntrue\n";
  })
  n
