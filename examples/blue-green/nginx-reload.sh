#!/bin/sh
# ExecReload= of the blue-green proxy: nginx-reload NGINX CONF MAINPID
#
# nginx reloads gracefully but asynchronously: SIGHUP makes the master start
# workers with the new configuration and then ask the old ones to finish the
# requests they have and exit. This returns only once that happened (every old
# worker gone, a new one running), so that whoever reloads knows nothing is
# proxied to the old upstream any more. The configuration is checked first: a
# bad one is refused before nginx sees the signal.
set -eu
nginx=$1 conf=$2 master=$3

"$nginx" -t -q -e stderr -c "$conf"
old=$(pgrep -P "$master" || true)
kill -HUP "$master"

deadline=$(($(date +%s) + ${BG_DRAIN_TIMEOUT:-60}))
while :; do
    left=
    for pid in $old; do
        if kill -0 "$pid" 2>/dev/null; then left="$left $pid"; fi
    done
    workers=$(pgrep -P "$master" || true)
    if [ -z "$left" ] && [ -n "$workers" ]; then
        exit 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "nginx-reload: old workers$left still running; the reload did not finish" >&2
        exit 1
    fi
    sleep 0.1
done
