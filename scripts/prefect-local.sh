#!/usr/bin/env bash
# The local Prefect server and worker of this project, managed by PID files (never by process name).
#
#   scripts/prefect-local.sh server-start | server-stop | server-status | pool | deploy | worker-start | worker-stop | env
#
# Everything lives in $PREFECT_SERVER_HOME (default ./workspace/prefect-server): PREFECT_HOME, the SQLite
# database prefect.db, the logs server.log / worker.log and the PID files. Settings (environment):
#   PREFECT_PORT (4200)   WORK_POOL (finetune)   PREFECT_FILE (prefect.yaml)   BIN (.venv/bin)
# The server binds 127.0.0.1 only. Used by mk/server.mk (make server, make worker, ...) and the e2e tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PWD="$ROOT"  # the deployments' pull step runs flow runs in the worker's $PWD
BIN="${BIN:-.venv/bin}"
PORT="${PREFECT_PORT:-4200}"
HOST=127.0.0.1
HOME_DIR="${PREFECT_SERVER_HOME:-$ROOT/workspace/prefect-server}"
POOL="${WORK_POOL:-finetune}"
PREFECT_FILE="${PREFECT_FILE:-prefect.yaml}"
API="http://$HOST:$PORT/api"
WAIT_S="${PREFECT_WAIT_S:-120}"

mkdir -p "$HOME_DIR"
HOME_DIR="$(cd "$HOME_DIR" && pwd)"
export PREFECT_HOME="$HOME_DIR"
export PREFECT_API_URL="$API"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1

alive() {  # alive PIDFILE -> 0 when the PID in it runs a prefect process we started
  local pidfile="$1" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q prefect
}

healthy() { "$BIN/python" - "$API" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/health", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

stop_group() {  # stop_group PIDFILE NAME: TERM the process group led by the PID, then KILL after 20 s
  local pidfile="$1" name="$2" pid
  if ! alive "$pidfile"; then
    echo "$name: not running (no live process in $pidfile)"
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}

start_bg() {  # start_bg PIDFILE LOG CMD...: own session (PGID = PID), so stop_group ends its children too
  local pidfile="$1" log="$2"
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

worker_started() { grep -q "started" "$HOME_DIR/worker.log" 2>/dev/null; }

# await_start NAME WHAT CHECK: wait up to WAIT_S for CHECK to succeed; if NAME's process dies first, show its log
await_start() {
  local name="$1" what="$2" check="$3"
  for _ in $(seq 1 $((WAIT_S * 2))); do
    "$check" && return 0
    if ! alive "$HOME_DIR/$name.pid"; then
      echo "error: $what exited; last lines of $HOME_DIR/$name.log:" >&2
      tail -n 30 "$HOME_DIR/$name.log" >&2 || true
      rm -f "$HOME_DIR/$name.pid"
      exit 1
    fi
    sleep 0.5
  done
}

case "${1:-}" in
  server-start)
    if alive "$HOME_DIR/server.pid"; then
      echo "Prefect server already running (pid $(cat "$HOME_DIR/server.pid"))"
    else
      if healthy; then
        echo "error: something else already answers on $API; fix: stop it or choose another PREFECT_PORT" >&2
        exit 1
      fi
      PREFECT_SERVER_API_HOST="$HOST" PREFECT_SERVER_API_PORT="$PORT" PREFECT_UI_API_URL="$API" \
        PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$HOME_DIR/prefect.db" \
        start_bg "$HOME_DIR/server.pid" "$HOME_DIR/server.log" \
        "$BIN/prefect" server start --host "$HOST" --port "$PORT" --analytics-off
      await_start server "the Prefect server" healthy
      healthy || { echo "error: no answer from $API after ${WAIT_S}s; see $HOME_DIR/server.log" >&2; exit 1; }
      echo "Prefect server running (pid $(cat "$HOME_DIR/server.pid")); database $HOME_DIR/prefect.db, log $HOME_DIR/server.log"
    fi
    echo "Dashboard: http://$HOST:$PORT"
    echo "For other shells: export PREFECT_API_URL=$API"
    ;;
  server-stop)
    stop_group "$HOME_DIR/server.pid" "Prefect server"
    ;;
  server-status)
    if alive "$HOME_DIR/server.pid" && healthy; then
      echo "Prefect server running (pid $(cat "$HOME_DIR/server.pid")); dashboard http://$HOST:$PORT"
    else
      echo "Prefect server not running"; exit 1
    fi
    if alive "$HOME_DIR/worker.pid"; then echo "worker running (pid $(cat "$HOME_DIR/worker.pid")), pool $POOL"; fi
    ;;
  pool)
    if "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1; then
      echo "work pool '$POOL' exists"
    else
      "$BIN/prefect" work-pool create "$POOL" --type process
    fi
    ;;
  deploy)
    "$BIN/prefect" --no-prompt deploy --all --prefect-file "$PREFECT_FILE"
    ;;
  worker-start)
    if alive "$HOME_DIR/worker.pid"; then
      echo "worker already running (pid $(cat "$HOME_DIR/worker.pid"))"
      exit 0
    fi
    healthy || { echo "error: no Prefect server at $API; fix: make server" >&2; exit 1; }
    # flow runs inherit this environment; the deployments' pull step runs them in $PWD (the project root)
    start_bg "$HOME_DIR/worker.pid" "$HOME_DIR/worker.log" \
      "$BIN/prefect" worker start --pool "$POOL" --type process --name "finetune-local-$PORT"
    await_start worker "the worker" worker_started
    echo "worker running (pid $(cat "$HOME_DIR/worker.pid")) on pool '$POOL'; log $HOME_DIR/worker.log"
    ;;
  worker-stop)
    stop_group "$HOME_DIR/worker.pid" "worker"
    ;;
  env)
    echo "export PREFECT_API_URL=$API"
    ;;
  *)
    echo "usage: $0 server-start|server-stop|server-status|pool|deploy|worker-start|worker-stop|env" >&2
    exit 2
    ;;
esac
