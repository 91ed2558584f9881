#!/bin/sh
# blue-green: deploy a new version of a service without dropping a request.
#
#   blue-green activate     the profile's bin/activate (default.nix writes it)
#   blue-green deactivate   its bin/deactivate
#
# Two colours of the service, NAME@blue.service and NAME@green.service, listen on
# two ports; a reverse proxy, NAME-proxy.service, sends all traffic to the live one.
# Activating a new version:
#
#   1. starts the new version as the idle colour, beside the live one;
#   2. runs the health check against the idle colour's own port until it passes
#      (at most BG_HEALTH_TIMEOUT seconds). If it does not pass, the idle colour is
#      stopped and activate fails: the proxy was not touched, the live colour goes on
#      serving, and hail rolls the profile back (the previous version's activate then
#      finds its colour live and does nothing);
#   3. points the proxy's upstream at the idle colour and reloads the proxy; the
#      reload (the proxy unit's ExecReload=) returns once nothing is proxied to the
#      old colour any more;
#   4. stops the old colour.
#
# Activating the version that is live already changes nothing and restarts nothing.
# Everything lives in /run: after a reboot, hail-activate@ runs activate again and
# the service comes back as blue.
#
# The environment, set by bin/activate:
#   BG_NAME            the service's name
#   BG_SHARE           this version's files: proxy.service, and for each colour
#                      COLOUR/unit, COLOUR/upstream.conf, COLOUR/health-check
#   BG_HEALTH_TIMEOUT  seconds the new colour has to pass its health check (30)
#   BG_UNIT_DIR        where units go (/run/systemd/system)
#   BG_STATE_DIR       the live colour and the proxy's upstream (/run/NAME-blue-green)
set -eu

: "${BG_NAME:?}" "${BG_SHARE:?}"
unit_dir=${BG_UNIT_DIR:-/run/systemd/system}
state=${BG_STATE_DIR:-/run/$BG_NAME-blue-green}
timeout=${BG_HEALTH_TIMEOUT:-30}
proxy=$BG_NAME-proxy.service

log() { echo "blue-green $BG_NAME: $*" >&2; }
unit() { echo "$BG_NAME@$1.service"; }
other() { if [ "$1" = blue ]; then echo green; else echo blue; fi; }

# Copies $1 to $2 atomically; true if $2 changed.
put() {
    cmp -s "$1" "$2" && return 1
    cp "$1" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}

# Retries the colour's health check every 0.5 s until it passes or time is up.
healthy() {
    deadline=$(($(date +%s) + timeout))
    until "$BG_SHARE/$1/health-check"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

activate() {
    mkdir -p "$unit_dir" "$state"
    live=$(cat "$state/live" 2>/dev/null || true)
    case $live in blue | green) ;; *) live= ;; esac

    if [ -n "$live" ] &&
        cmp -s "$BG_SHARE/$live/unit" "$unit_dir/$(unit "$live")" &&
        cmp -s "$BG_SHARE/$live/upstream.conf" "$state/upstream.conf" &&
        cmp -s "$BG_SHARE/proxy.service" "$unit_dir/$proxy" &&
        systemctl -q is-active "$(unit "$live")" &&
        systemctl -q is-active "$proxy"; then
        log "$live serves this version already; nothing to do"
        return 0
    fi

    # 1. The new version beside the old one.
    if [ -n "$live" ]; then new=$(other "$live"); else new=blue; fi
    put "$BG_SHARE/$new/unit" "$unit_dir/$(unit "$new")" || true
    systemctl daemon-reload
    log "starting $new"
    systemctl restart "$(unit "$new")"

    # 2. Its health check, on its own port.
    if ! healthy "$new"; then
        log "$new did not pass its health check within $timeout s; stopping it${live:+, $live goes on serving}"
        systemctl stop "$(unit "$new")"
        exit 1
    fi

    # 3. Traffic moves.
    cp "$BG_SHARE/$new/upstream.conf" "$state/upstream.conf.tmp.$$"
    mv -f "$state/upstream.conf.tmp.$$" "$state/upstream.conf"
    if put "$BG_SHARE/proxy.service" "$unit_dir/$proxy"; then
        # A new proxy configuration needs a new proxy process: the only step that
        # may drop requests, and only when the proxy itself changed.
        systemctl daemon-reload
        log "proxy unit changed: restarting $proxy"
        systemctl restart "$proxy"
    elif ! systemctl -q is-active "$proxy"; then
        systemctl start "$proxy"
    elif ! systemctl reload "$proxy"; then
        log "the proxy did not reload; ${live:-nothing} goes on serving"
        if [ -n "$live" ]; then
            cp "$BG_SHARE/$live/upstream.conf" "$state/upstream.conf.tmp.$$"
            mv -f "$state/upstream.conf.tmp.$$" "$state/upstream.conf"
        fi
        systemctl stop "$(unit "$new")"
        exit 1
    fi
    echo "$new" >"$state/live.tmp.$$"
    mv -f "$state/live.tmp.$$" "$state/live"
    log "$new is live"

    # 4. The old colour stops.
    if [ -n "$live" ]; then
        systemctl stop "$(unit "$live")"
        log "stopped $live"
    fi
}

deactivate() {
    units="$proxy $(unit blue) $(unit green)"
    # Units that were never loaded (never activated) make stop fail: go on.
    # shellcheck disable=SC2086 # three unit names
    systemctl stop $units || true
    for u in $units; do rm -f "$unit_dir/$u"; done
    systemctl daemon-reload
    rm -rf "$state"
    log "stopped and removed $units"
}

case ${1:-} in
activate) activate ;;
deactivate) deactivate ;;
*)
    echo "usage: blue-green activate|deactivate" >&2
    exit 2
    ;;
esac
