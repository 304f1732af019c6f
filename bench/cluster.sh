#!/usr/bin/env bash
# NODES Kabar nodes (default 2) on one PostgreSQL with a NATS bus between
# them, and one kabar-bench scenario whose room members are spread over the
# nodes (`--spread`): messages are sent through one node and delivered
# through another. Prints the scenario's JSON, then one line per node with
# the CPU seconds it used during the scenario, then what NATS carried
# meanwhile (messages and bytes into and out of the server).
#
#   PG_PORT=55432 bench/cluster.sh messages --users 50 --rooms 10 --seconds 20
#
# PG_PORT names a PostgreSQL server on 127.0.0.1 where the user `kabar` may
# create databases (each run gets a new one). ONLY_FIRST=1 sends every
# client to the first node (the others then only apply what it commits).
# LB=1 puts HAProxy (scripts/haproxy.cfg.in: round robin, and each room's
# writes to one node) in front and sends every client through it;
# LB=roundrobin does the same with every request round robin.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PG_PORT:?set PG_PORT to a PostgreSQL server on 127.0.0.1}"
NODES=${NODES:-2}
KABAR=${KABAR:-target/release/kabar}
BENCH=${BENCH:-target/release/kabar-bench}
[ -x "$KABAR" ] && [ -x "$BENCH" ] || cargo build --release -p kabar -p kabar-bench >&2
export PATH="$PATH:/usr/sbin:$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

db="kabar_cluster_$(date +%s%N)"
createdb -h 127.0.0.1 -p "$PG_PORT" -U kabar "$db"
nats_port=$(free_port)
nats_monitor=$(free_port)
nats-server -a 127.0.0.1 -p "$nats_port" -m "$nats_monitor" >"$work/nats.log" 2>&1 &
pids+=($!)

urls=()
node_pids=()
for i in $(seq 0 $((NODES - 1))); do
  port=$(free_port)
  cat >"$work/node-$i.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$work/node-$i"
[limits]
max_connections_per_address = 0
to_device_messages_per_second = 1000000
to_device_burst = 1000000
[admission.register]
per_address_per_minute = 0
[admission.login]
per_address_per_minute = 0
[storage]
engine = "postgres"
postgres.url = "postgres://kabar@127.0.0.1:$PG_PORT/$db"
[bus]
engine = "nats"
nats.urls = ["nats://127.0.0.1:$nats_port"]
node_name = "node-$i"
TOML
  "$KABAR" serve --config "$work/node-$i.toml" >"$work/node-$i.log" 2>&1 &
  pids+=($!)
  node_pids+=($!)
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/_matrix/client/versions" >/dev/null && break
    sleep 0.5
  done
  urls+=("http://127.0.0.1:$port")
done

spread=()
target=${urls[0]}
if [ -n "${LB:-}" ]; then
  lb_port=$(free_port)
  servers=""
  for i in "${!urls[@]}"; do servers+="    server node-$i ${urls[$i]#http://} check"$'\n'; done
  python3 - "$work/haproxy.cfg" "127.0.0.1:$lb_port" "$servers" "$LB" <<'PY'
import sys
out, bind, servers, mode = sys.argv[1:]
template = open("scripts/haproxy.cfg.in").read()
if mode == "roundrobin":
    template = template.replace("    use_backend kabar_by_room if room_write\n", "")
open(out, "w").write(template.replace("@BIND@", bind).replace("@CHECK@", "inter 1s fall 2 rise 2")
                     .replace("@SERVERS@\n", servers).replace("@FALLBACKS@\n", ""))
PY
  haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 40); do
    curl -sf "http://127.0.0.1:$lb_port/_matrix/client/versions" >/dev/null && break
    sleep 0.25
  done
  target="http://127.0.0.1:$lb_port"
elif [ -z "${ONLY_FIRST:-}" ]; then
  for u in "${urls[@]:1}"; do spread+=(--spread "$u"); done
fi
nats_bytes() { curl -s "http://127.0.0.1:$nats_monitor/varz" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["in_msgs"], v["in_bytes"], v["out_msgs"], v["out_bytes"])'; }
before=()
for pid in "${node_pids[@]}"; do before+=("$(cpu "$pid")"); done
nats_before=$(nats_bytes)
start=$(date +%s.%N)
"$BENCH" --url "$target" "${spread[@]}" --json "$@"
end=$(date +%s.%N)
nats_after=$(nats_bytes)
for i in "${!node_pids[@]}"; do
  after=$(cpu "${node_pids[$i]}")
  python3 -c "print('node-$i cpu_seconds', round(($after - ${before[$i]}) / 100, 2), 'of', round($end - $start, 1), 's')"
done
python3 -c "
b = [int(x) for x in '$nats_before'.split()]
a = [int(x) for x in '$nats_after'.split()]
d = [x - y for x, y in zip(a, b)]
print('nats in_msgs', d[0], 'in_bytes', d[1], 'out_msgs', d[2], 'out_bytes', d[3])"
