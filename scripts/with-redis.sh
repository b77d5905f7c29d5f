#!/usr/bin/env bash
# Run a command with a Redis answering at $RAPPORT_REDIS_URL (default
# redis://127.0.0.1:6379/0). When nothing answers there, start a private
# redis-server on that port with append-only persistence in .data/redis,
# installing it with apt-get where possible, and stop it when the command exits.
set -euo pipefail

url="${RAPPORT_REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=6379
root="$(cd "$(dirname "$0")/.." && pwd)"

answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG
  else
    # No redis-cli: speak RESP ourselves through bash's /dev/tcp.
    exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    local reply; read -r -t 2 reply <&3 || true
    exec 3>&-
    [[ "$reply" == +PONG* ]]
  fi
}

if answers; then
  exec "$@"
fi

case "$host" in
  127.0.0.1|localhost|::1) ;;
  *) echo "Redis at $url does not answer, and it is not on this machine: start it, or set RAPPORT_REDIS_URL." >&2; exit 1 ;;
esac

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "with-redis: installing redis-server with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "Redis is needed and redis-server is not installed." >&2
    echo "Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)" >&2
    echo "or point RAPPORT_REDIS_URL at a running Redis." >&2
    exit 1
  fi
fi

data="$root/.data/redis"
mkdir -p "$data"
echo "with-redis: starting a private redis-server on $host:$port (append-only, data in .data/redis)"
redis-server --bind "$host" --port "$port" --dir "$data" --appendonly yes --appendfsync everysec \
  --save "" --daemonize no --logfile "$data/redis.log" &
redis_pid=$!
cleanup() { kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for _ in $(seq 1 50); do answers && break; sleep 0.1; done
answers || { echo "with-redis: redis-server did not start; see $data/redis.log" >&2; exit 1; }
"$@"
