#!/usr/bin/env bash
# Makes sure a Redis answers on 127.0.0.1:6379, for tests/redis.rs: does nothing when one
# already does; else starts redis-server (installing Debian's package first when it is missing
# and we are root) without persistence, and waits for it. Exits non-zero if no Redis answers.
set -euo pipefail

HOST=127.0.0.1
PORT=6379

answers() {
    [ "$(redis-cli -h "$HOST" -p "$PORT" ping 2>/dev/null)" = "PONG" ]
}

if command -v redis-cli >/dev/null 2>&1 && answers; then
    echo "redis-up: Redis answers on $HOST:$PORT"
    exit 0
fi

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "redis-up: redis-server or redis-cli is missing; install them (apt-get install redis-server)" >&2
        exit 1
    fi
    echo "redis-up: installing redis-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
    # The package may have started its own service.
    if answers; then
        echo "redis-up: Redis answers on $HOST:$PORT"
        exit 0
    fi
fi

echo "redis-up: starting redis-server on $HOST:$PORT"
redis-server --daemonize yes --port "$PORT" --bind "$HOST" --save "" --appendonly no \
    --logfile /tmp/redis-up-"$PORT".log

for _ in $(seq 1 100); do
    if answers; then
        echo "redis-up: Redis answers on $HOST:$PORT"
        exit 0
    fi
    sleep 0.1
done
echo "redis-up: Redis did not answer on $HOST:$PORT within 10 s; see /tmp/redis-up-$PORT.log" >&2
exit 1
