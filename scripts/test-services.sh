#!/usr/bin/env bash
# The services the tests need, set up one way for `make test` and CI (.ci/run calls `make test`).
#
#   scripts/test-services.sh run [--need LIST] -- COMMAND...
#       install what is missing, start throwaway PostgreSQL and Redis, run COMMAND with DATABASE_URL
#       and REDIS_URL exported, stop the servers and remove their data (also when COMMAND fails or is
#       interrupted), then print a summary of the JUnit reports COMMAND wrote: what was skipped and why.
#       Exits with COMMAND's status. Nested inside another `run`, it only runs COMMAND.
#   scripts/test-services.sh install [--need LIST]
#       install what is missing (apt-get, only as root on Debian/Ubuntu); otherwise say what to install.
#   eval "$(scripts/test-services.sh start [--need LIST])"
#       start the servers and print their exports, for a session by hand; end it with `stop`.
#   scripts/test-services.sh stop
#       stop every server started under var/test-services/ and remove its data.
#
# LIST is a comma-separated subset of chromium,postgresql,redis (default: all three).
# TEST_SERVICES_INSTALL=0 never installs anything, even as root (it only says what is missing).
# A DATABASE_URL or REDIS_URL already set is used as it is: no server is started for it.
# What cannot be installed or started is reported and left out; the tests that need it skip, and the
# summary names them. PostgreSQL's binaries are looked for under /usr/lib/postgresql/*/bin, then on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_ROOT="$ROOT/var/test-services"
JUNIT_DIR="${JUNIT_DIR:-$ROOT/test-results/junit}"
CHROMIUM_DEFAULT="/usr/bin/chromium"
STARTUP_TIMEOUT_S=60

NEED="chromium,postgresql,redis"
RUN_DIR=""
SINCE=""
NOTES=()        # "service|what went wrong and what to do": shown again in the summary
STARTED=()      # "what is running where", for the summary

say() { echo "test-services: $*" >&2; }
note() { NOTES+=("$1|$2"); say "$1: $2"; }
needs() { [[ ",$NEED," == *",$1,"* ]]; }
is_root() { [ "$(id -u)" = 0 ]; }

# ---------------------------------------------------------------- what is there

chromium_path() {
  local candidate="${CHROMIUM:-$CHROMIUM_DEFAULT}"
  if [ -x "$candidate" ]; then echo "$candidate"; else command -v chromium 2>/dev/null; fi
}

postgres_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  return 1
}

# Debian package per missing service (only those this run needs and that are not given by URL).
missing_packages() {
  local packages=()
  if needs chromium && [ -z "$(chromium_path)" ]; then packages+=(chromium); fi
  if needs postgresql && [ -z "${DATABASE_URL:-}" ] && ! postgres_bindir >/dev/null; then packages+=(postgresql); fi
  if needs redis && [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then packages+=(redis-server); fi
  echo "${packages[*]:-}"
}

# ---------------------------------------------------------------- install

install_missing() {
  local missing
  missing="$(missing_packages)"
  [ -n "$missing" ] || return 0
  if [ "${TEST_SERVICES_INSTALL:-1}" != 0 ] && is_root && command -v apt-get >/dev/null 2>&1; then
    say "installing $missing (apt-get)"
    # shellcheck disable=SC2086  # one word per package
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; then
      return 0
    fi
    say "apt-get could not install $missing"
  fi
  missing="$(missing_packages)"
  [ -n "$missing" ] || return 0
  say "missing: $missing. Install it, then run again:"
  say "    Debian/Ubuntu: sudo apt-get install $missing"
  say "    elsewhere:     the same from your package manager (PostgreSQL: initdb and pg_ctl on PATH; Chromium: or CHROMIUM=/path)"
  say "continuing with what is available; the tests that need the rest are skipped (see the summary)."
}

# ---------------------------------------------------------------- start

free_port() {
  local python port
  python="$(command -v python3 || true)"
  if [ -n "$python" ]; then
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  for _ in $(seq 100); do
    port=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
  done
  return 1
}

# PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
as_postgres() {
  if is_root; then
    if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su -s /bin/sh postgres -c '"$0" "$@"' -- "$@"; fi
  else
    "$@"
  fi
}

start_postgresql() {
  local bindir dir port
  if ! bindir="$(postgres_bindir)"; then
    note postgresql "not installed (Debian: apt-get install postgresql); tests that need a PostgreSQL DATABASE_URL are skipped"
    return 0
  fi
  dir="$RUN_DIR/postgresql"
  mkdir -p "$dir"
  if is_root; then
    if ! id -u postgres >/dev/null 2>&1; then
      note postgresql "running as root and there is no 'postgres' user to run the server as (useradd --system postgres); tests that need PostgreSQL are skipped"
      return 0
    fi
    chown postgres "$dir"
    if ! as_postgres test -w "$dir"; then
      # The checkout is not reachable for the postgres user (a private home, say): a temp dir instead.
      rmdir "$dir"
      dir="$(mktemp -d "${TMPDIR:-/tmp}/concord-test-postgresql.XXXXXX")"
      chown postgres "$dir"
    fi
  fi
  echo "$dir" >"$RUN_DIR/postgresql.dir"
  echo "$bindir" >"$RUN_DIR/postgresql.bin"
  port="$(free_port)"
  if ! as_postgres "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale --no-sync >"$RUN_DIR/initdb.log" 2>&1; then
    note postgresql "initdb failed ($(tail -n 3 "$RUN_DIR/initdb.log" | tr '\n' ' ')); tests that need PostgreSQL are skipped"
    return 0
  fi
  # A throwaway cluster: private port and socket directory, no durability.
  cat >>"$dir/data/postgresql.conf" <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  if ! as_postgres "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t "$STARTUP_TIMEOUT_S" start >/dev/null 2>&1; then
    note postgresql "the server did not start ($(tail -n 3 "$dir/server.log" 2>/dev/null | tr '\n' ' ')); tests that need PostgreSQL are skipped"
    return 0
  fi
  if ! "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres concord >/dev/null; then
    note postgresql "createdb concord failed; tests that need PostgreSQL are skipped"
    return 0
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/concord"
  STARTED+=("PostgreSQL $("$bindir/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$port (throwaway cluster in $dir)")
}

redis_answers() {
  local port=$1
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

start_redis() {
  local server dir port
  if ! server="$(command -v redis-server)"; then
    note redis "not installed (Debian: apt-get install redis-server); tests that need REDIS_URL are skipped"
    return 0
  fi
  dir="$RUN_DIR/redis"
  mkdir -p "$dir"
  port="$(free_port)"
  if ! "$server" --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null; then
    note redis "redis-server did not start; tests that need REDIS_URL are skipped"
    return 0
  fi
  for _ in $(seq $((STARTUP_TIMEOUT_S * 10))); do
    redis_answers "$port" && break
    sleep 0.1
  done
  if ! redis_answers "$port"; then
    note redis "redis-server did not answer on port $port ($(tail -n 3 "$dir/redis.log" 2>/dev/null | tr '\n' ' ')); tests that need REDIS_URL are skipped"
    return 0
  fi
  export REDIS_URL="redis://127.0.0.1:$port/0"
  STARTED+=("Redis $("$server" --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') on 127.0.0.1:$port (throwaway, in $dir)")
}

start_services() {
  mkdir -p "$STATE_ROOT"
  RUN_DIR="$(mktemp -d "$STATE_ROOT/run.XXXXXX")"
  chmod 755 "$RUN_DIR"  # the postgres user must reach the cluster's directory inside it
  if needs postgresql; then
    if [ -n "${DATABASE_URL:-}" ]; then STARTED+=("DATABASE_URL as given: ${DATABASE_URL%%\?*}"); else start_postgresql; fi
  fi
  if needs redis; then
    if [ -n "${REDIS_URL:-}" ]; then STARTED+=("REDIS_URL as given: $REDIS_URL"); else start_redis; fi
  fi
  if needs chromium; then
    local chromium
    chromium="$(chromium_path || true)"
    if [ -n "$chromium" ]; then
      STARTED+=("Chromium $chromium")
    else
      note chromium "not installed (Debian: apt-get install chromium; or CHROMIUM=/path/to/chromium); the browser tests (tests/e2e) are not run"
    fi
  fi
  local line
  for line in "${STARTED[@]}"; do say "$line"; done
}

# ---------------------------------------------------------------- stop

stop_run_dir() {
  local run=$1 pgdir bindir pid
  if [ -f "$run/postgresql.dir" ]; then
    pgdir="$(cat "$run/postgresql.dir")"
    bindir="$(cat "$run/postgresql.bin" 2>/dev/null || true)"
    if [ -f "$pgdir/data/postmaster.pid" ]; then
      if ! as_postgres "$bindir/pg_ctl" -D "$pgdir/data" -m fast -w -t 30 stop >/dev/null 2>&1; then
        pid="$(head -n 1 "$pgdir/data/postmaster.pid" 2>/dev/null || true)"
        [ -z "$pid" ] || kill -QUIT "$pid" 2>/dev/null || true
      fi
    fi
    case "$pgdir" in "$run"/*) ;; *) rm -rf "$pgdir" ;; esac
  fi
  if [ -f "$run/redis/redis.pid" ]; then
    pid="$(cat "$run/redis/redis.pid")"
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -rf "$run"
}

stop_all() {
  local run
  for run in "$STATE_ROOT"/run.*; do
    [ -d "$run" ] || continue
    say "stopping the servers of $run"
    stop_run_dir "$run"
  done
  rmdir "$STATE_ROOT" 2>/dev/null || true
}

# ---------------------------------------------------------------- summary

summary() {
  local python="$ROOT/.venv/bin/python"
  [ -x "$python" ] || python="$(command -v python3 || true)"
  [ -n "$python" ] || return 0
  local args=(--since "$1" --junit-dir "$JUNIT_DIR") line
  for line in "${STARTED[@]}"; do args+=(--service "$line"); done
  for line in "${NOTES[@]}"; do args+=(--missing "$line"); done
  "$python" "$ROOT/scripts/test_summary.py" "${args[@]}" || true
}

# ---------------------------------------------------------------- commands

parse_need() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --need) NEED="$2"; shift 2 ;;
      --need=*) NEED="${1#--need=}"; shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  ARGS=("$@")
}

cmd_run() {
  parse_need "$@"
  set -- "${ARGS[@]}"
  [ $# -gt 0 ] || { say "usage: $0 run [--need LIST] -- COMMAND..."; exit 2; }
  if [ -n "${CONCORD_TEST_SERVICES:-}" ]; then
    exec "$@"  # inside an outer run: its servers are in DATABASE_URL / REDIS_URL already
  fi
  install_missing
  mkdir -p "$STATE_ROOT" "$JUNIT_DIR"
  local rc=0
  SINCE="$(date +%s)"
  trap 'finish' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  start_services
  export CONCORD_TEST_SERVICES=1
  "$@" || rc=$?
  exit "$rc"
}

# On every exit of `run`: stop the servers, then the summary (so that it is the last thing printed).
finish() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$RUN_DIR" ]; then
    stop_run_dir "$RUN_DIR"
    rmdir "$STATE_ROOT" 2>/dev/null || true
    summary "$SINCE"
  fi
  exit "$rc"
}

cmd_start() {
  parse_need "$@"
  install_missing
  start_services
  [ -z "${DATABASE_URL:-}" ] || echo "export DATABASE_URL='$DATABASE_URL'"
  [ -z "${REDIS_URL:-}" ] || echo "export REDIS_URL='$REDIS_URL'"
  say "started under $RUN_DIR; stop with: $0 stop"
}

case "${1:-}" in
  run) shift; cmd_run "$@" ;;
  install) shift; parse_need "$@"; install_missing ;;
  start) shift; cmd_start "$@" ;;
  stop) stop_all ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
