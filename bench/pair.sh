#!/usr/bin/env bash
# Paired runs of one kabar-bench scenario against two Kabar builds, in the
# same minutes: A, B, A, B, ... each on a fresh server and data directory,
# with the per-address limits off (the load comes from one address). Prints
# one JSON line per run, labelled A or B, for medians and ratios.
#
#   bench/pair.sh REPEAT KABAR_A KABAR_B -- messages --users 50 --rooms 10 --seconds 20
#
# KABAR_A and KABAR_B are `kabar` binaries (for example an older commit's
# release build in another target directory, and this one's). Extra server
# configuration can be appended through PAIR_CONFIG (TOML text, both sides),
# PAIR_CONFIG_A and PAIR_CONFIG_B (one side each). With PAIR_PGPORT set (a
# PostgreSQL server on 127.0.0.1 with a `kabar` user allowed to create
# databases), `@DB@` in the configuration becomes a new, empty database for
# each run. PAIR_BENCH_A and PAIR_BENCH_B add load-generator options to one
# side (for example `--sliding` on one build against itself, to compare
# sliding sync with /v3/sync):
#
#   PAIR_PGPORT=55432 PAIR_CONFIG_B='[storage]
#   engine = "postgres"
#   postgres.url = "postgres://kabar@127.0.0.1:55432/@DB@"' \
#     bench/pair.sh 3 target/release/kabar target/release/kabar -- messages
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=$1; a=$2; b=$3; shift 3
[ "${1:-}" = "--" ] && shift
BENCH=${BENCH:-target/release/kabar-bench}
[ -x "$BENCH" ] || cargo build --release -p kabar-bench >&2

run_one() {
  local label=$1 kabar=$2 side_config=$3 side_bench=$4; shift 4
  local dir; dir=$(mktemp -d)
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$dir/kabar.toml" <<TOML
[limits]
max_connections_per_address = 0
to_device_messages_per_second = 1000000
to_device_burst = 1000000
[admission.register]
per_address_per_minute = 0
[admission.login]
per_address_per_minute = 0
${PAIR_CONFIG:-}
${side_config}
TOML
  if [ -n "${PAIR_PGPORT:-}" ] && grep -q '@DB@' "$dir/kabar.toml"; then
    local db="kabar_pair_$(date +%s%N)"
    createdb -h 127.0.0.1 -p "$PAIR_PGPORT" -U kabar "$db"
    sed -i "s/@DB@/$db/g" "$dir/kabar.toml"
  fi
  "$kabar" serve --config "$dir/kabar.toml" --listen "127.0.0.1:$port" --data-dir "$dir/data" >"$dir/stdout.log" 2>"$dir/stderr.log" &
  local pid=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null && break
    sleep 0.5
  done
  local out
  # shellcheck disable=SC2086 # side_bench is a list of options
  out=$("$BENCH" --url "http://127.0.0.1:$port" --json $side_bench "$@" 2>"$dir/bench.log" || echo '{"failed": true}')
  echo "{\"label\": \"$label\", \"result\": $out}"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

for _ in $(seq 1 "$repeat"); do
  run_one A "$a" "${PAIR_CONFIG_A:-}" "${PAIR_BENCH_A:-}" "$@"
  run_one B "$b" "${PAIR_CONFIG_B:-}" "${PAIR_BENCH_B:-}" "$@"
done
