# Shared helpers of the A/B scripts (source it: `. "$(dirname "$0")/lib.sh"`).
#
# A script defines `run NAME ...` (one measured run) and `LOCK` (a lock file or empty),
# then calls `one_run_dispatch "$@"` before its loops: invoked as `$0 --one NAME ...`
# it performs that single run and exits. `locked_run NAME ...` runs one under
# `flock $LOCK` by calling the script back that way, so no two benchmarks overlap.

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# User + system CPU ticks (1/100 s) of a process.
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# Waits (≤ 20 s) until the metrics endpoint on PORT answers.
wait_metrics() { # port
  local i
  for i in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/metrics" && return 0
    sleep 0.2
  done
  return 1
}

# Waits (≤ 60 s) until every replica of the node behind ADMIN is in sync, no resync left.
wait_in_sync() { # cli admin-socket
  local i
  for i in $(seq 1 120); do
    "$1" --admin-socket "$2" status --json 2>/dev/null \
      | python3 -c 'import json,sys
v=json.load(sys.stdin); v=v["volumes"][0] if "volumes" in v else v
r=v.get("replicas",[])
sys.exit(0 if r and all(x.get("state")=="in-sync" and not x.get("resync") for x in r) else 1)' 2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}

# The daemon's metrics on PORT into FILE (empty if it does not answer).
scrape_metrics() { # port file
  curl -s "http://127.0.0.1:$1/metrics" > "$2" 2>/dev/null || : > "$2"
}

# Called back under the lock: `$0 --one NAME ...` runs `run NAME ...` and exits.
one_run_dispatch() {
  if [ "${1:-}" = --one ]; then
    shift
    run "$@"
    exit
  fi
}

# One run, under `flock $LOCK` if LOCK is set.
locked_run() {
  if [ -n "${LOCK:-}" ]; then
    flock "$LOCK" "$0" --one "$@"
  else
    run "$@"
  fi
}
