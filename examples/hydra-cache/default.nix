# A caching nginx front for Hydra, for many hosts running hail (see README.md in this
# directory). A NixOS module; in the configuration of the machine that serves Hydra:
#
#   imports = [
#     (import ./examples/hydra-cache { hostName = "hydra.example.org"; })
#   ];
#   services.nginx.virtualHosts."hydra.example.org" = {
#     enableACME = true;
#     forceSSL = true;
#   };
#
# and the hosts' job URIs name https://hydra.example.org/job/…. This virtual host is
# Hydra's whole web front (its own `location /` proxies everything that is not
# cached): it replaces any other virtual host for the same name.
{
  # The name hosts use in --job-uri.
  hostName,
  # Hydra itself: hydra-server's address (services.hydra.listenHost/port).
  upstream ? "127.0.0.1:3000",
  # How long a `latest` redirect or a build object is reused: a new build reaches
  # a host at most this much later than without the front.
  lifetime ? "10s",
  # How long an error answer (404, 5xx) is reused.
  errorLifetime ? "2s",
  # nginx's cache directory on NixOS is /var/cache/nginx (CacheDirectory=nginx).
  cacheDir ? "/var/cache/nginx/hydra",
  # For a private Hydra: an htpasswd file (`htpasswd -B -c FILE HOST`) whose
  # logins this front checks itself (the virtual host's basicAuthFile), before
  # it answers from the cache. Hosts then share cached answers; a string keeps
  # the file out of the store. null: no login here, and requests that carry
  # credentials (for a proxy behind this one) are passed on and never cached.
  basicAuthFile ? null,
}:

let
  fill =
    template:
    builtins.replaceStrings
      [ "@UPSTREAM@" "@LIFETIME@" "@ERROR_LIFETIME@" "@CACHE_DIR@" "@AUTH_CHECKED@" ]
      [
        upstream
        lifetime
        errorLifetime
        cacheDir
        (if basicAuthFile == null then "0" else "1")
      ]
      (builtins.readFile template);
in
{
  services.nginx = {
    enable = true;
    appendHttpConfig = fill ./http.conf.in;
    virtualHosts.${hostName} = {
      extraConfig = fill ./server.conf.in;
    }
    // (if basicAuthFile == null then { } else { inherit basicAuthFile; });
  };
}
