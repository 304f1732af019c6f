#!/usr/bin/env bash
# Runs the same kabar-bench scenarios against Synapse and Kabar on this
# machine, in one run, and prints a table of the figures with Kabar/Synapse
# ratios. Synapse is installed into a virtualenv on first use.
#
#   bench/compare.sh                 # everything at the default sizes
#   SCENARIOS="register messages" bench/compare.sh
#   REPEAT=3 bench/compare.sh        # each scenario three times; the table shows medians
#
# Sizes can be set through the environment (see the defaults below). Results
# (JSON lines and the table) go to $WORK/results-<date>/.
#
#   PG_PORT=5432 bench/compare.sh    # both on PostgreSQL at 127.0.0.1:PG_PORT
#   BENCH_FLAGS=--sliding SCENARIOS="messages idle roomlist" bench/compare.sh
#                                    # clients follow with sliding sync (MSC4186)
#
# With PG_PORT, each run gets a new database on that server (user `kabar`,
# allowed to create databases, trusted on loopback; the server's encoding
# UTF8 with the C locale, as Synapse requires), Synapse with psycopg2.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${KABAR_BENCH_DIR:-$ROOT/target/bench}
SCENARIOS=${SCENARIOS:-"versions register messages todevice bigroom idle surge"}
REPEAT=${REPEAT:-1}
SYNAPSE_PORT=${SYNAPSE_PORT:-18448}
KABAR_PORT=${KABAR_PORT:-18449}

# Sizes: Synapse gets sizes it can finish in minutes; Kabar gets the issue's targets.
REG_SYNAPSE=${REG_SYNAPSE:-50};        REG_KABAR=${REG_KABAR:-1000};       REG_CONC=${REG_CONC:-16}
MSG_USERS=${MSG_USERS:-50};            MSG_ROOMS=${MSG_ROOMS:-10};         MSG_SECONDS=${MSG_SECONDS:-20}
TD_PAIRS=${TD_PAIRS:-25};              TD_SECONDS=${TD_SECONDS:-20}
BIG_SYNAPSE=${BIG_SYNAPSE:-500};       BIG_KABAR=${BIG_KABAR:-10000};      BIG_MESSAGES=${BIG_MESSAGES:-10}
IDLE_SYNAPSE=${IDLE_SYNAPSE:-2000};    IDLE_KABAR=${IDLE_KABAR:-50000};    IDLE_USERS=${IDLE_USERS:-200}
RL_SYNAPSE=${RL_SYNAPSE:-200};         RL_KABAR=${RL_KABAR:-2000};         RL_REQUESTS=${RL_REQUESTS:-50}
# surge: the same light chat on both (Synapse manages ~40 msgs/s in all), then
# Kabar alone under a busier chat.
SURGE_USERS=${SURGE_USERS:-20};        SURGE_ROOMS=${SURGE_ROOMS:-5};      SURGE_RATE=${SURGE_RATE:-0.5}
SURGE_BUSY_USERS=${SURGE_BUSY_USERS:-50}; SURGE_BUSY_ROOMS=${SURGE_BUSY_ROOMS:-10}; SURGE_BUSY_RATE=${SURGE_BUSY_RATE:-2}
SURGE_PHASES=${SURGE_PHASES:-"--capacity-seconds 10 --before 10 --flood 20 --after 15 --multiplier 10 --sources 16"}

mkdir -p "$WORK"
OUT="$WORK/results-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
log() { printf '== %s\n' "$*" >&2; }

log "building kabar and kabar-bench (release)"
cargo build --release -p kabar -p kabar-bench >&2
KABAR="$ROOT/target/release/kabar"
BENCH="$ROOT/target/release/kabar-bench"

# --- Synapse -------------------------------------------------------------
SYN="$WORK/synapse"
if [ ! -x "$SYN/venv/bin/python" ] || ! "$SYN/venv/bin/python" -c 'import synapse' 2>/dev/null; then
  log "installing Synapse into $SYN/venv"
  mkdir -p "$SYN"
  python3 -m venv "$SYN/venv"
  "$SYN/venv/bin/pip" install -q --upgrade pip >&2
  "$SYN/venv/bin/pip" install -q matrix-synapse >&2
fi
if [ -n "${PG_PORT:-}" ] && ! "$SYN/venv/bin/python" -c 'import psycopg2' 2>/dev/null; then
  log "installing Synapse's PostgreSQL driver"
  "$SYN/venv/bin/pip" install -q "matrix-synapse[postgres]" >&2
fi

# A new, empty PostgreSQL database for one run (PG_PORT only); prints its name.
new_database() {
  local db="$1_$(date +%s%N)"
  createdb -h 127.0.0.1 -p "$PG_PORT" -U kabar "$db"
  echo "$db"
}
SYNAPSE_VERSION=$("$SYN/venv/bin/python" -c 'import synapse; print(synapse.__version__)')

start_synapse() {
  local dir="$SYN/run"
  rm -rf "$dir"; mkdir -p "$dir"
  cat > "$dir/log.yaml" <<YAML
version: 1
formatters: {plain: {format: '%(asctime)s %(levelname)s %(name)s %(message)s'}}
handlers: {file: {class: logging.FileHandler, filename: $dir/homeserver.log, formatter: plain}}
root: {level: WARNING, handlers: [file]}
disable_existing_loggers: false
YAML
  local unlimited='{per_second: 1000000, burst_count: 1000000}'
  if [ -n "${PG_PORT:-}" ]; then
    SYNAPSE_DATABASE="{name: psycopg2, args: {user: kabar, host: 127.0.0.1, port: $PG_PORT, database: $(new_database synapse), cp_min: 5, cp_max: 10}}"
  else
    SYNAPSE_DATABASE="{name: sqlite3, args: {database: $dir/homeserver.db}}"
  fi
  cat > "$dir/homeserver.yaml" <<YAML
server_name: localhost
pid_file: $dir/homeserver.pid
listeners:
  - {port: $SYNAPSE_PORT, bind_addresses: ['127.0.0.1'], type: http, tls: false, x_forwarded: false, resources: [{names: [client], compress: false}]}
database: $SYNAPSE_DATABASE
log_config: $dir/log.yaml
media_store_path: $dir/media
signing_key_path: $dir/signing.key
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
registration_shared_secret: bench-secret
macaroon_secret_key: bench-macaroon
form_secret: bench-form
enable_registration: true
enable_registration_without_verification: true
rc_message: $unlimited
rc_registration: $unlimited
rc_registration_token_validity: $unlimited
rc_login: {address: $unlimited, account: $unlimited, failed_attempts: $unlimited}
rc_joins: {local: $unlimited, remote: $unlimited}
rc_joins_per_room: $unlimited
rc_invites: {per_room: $unlimited, per_user: $unlimited, per_issuer: $unlimited}
rc_presence: {per_user: $unlimited}
rc_room_creation: $unlimited
rc_admin_redaction: $unlimited
YAML
  "$SYN/venv/bin/python" -m synapse.app.homeserver --config-path "$dir/homeserver.yaml" --generate-keys >/dev/null 2>&1
  "$SYN/venv/bin/python" -m synapse.app.homeserver --config-path "$dir/homeserver.yaml" >"$dir/stdout.log" 2>&1 &
  SERVER_PID=$!
  wait_up "http://127.0.0.1:$SYNAPSE_PORT"
}

start_kabar() {
  local dir="$WORK/kabar-run"
  rm -rf "$dir"; mkdir -p "$dir"
  # Like Synapse above, no per-address limits: the load comes from a few
  # loopback addresses (thousands of long-polls each). The capacity-based
  # shedding stays as it ships.
  cat > "$dir/kabar.toml" <<TOML
[limits]
max_connections_per_address = 0
to_device_messages_per_second = 1000000
to_device_burst = 1000000
[admission.register]
per_address_per_minute = 0
[admission.login]
per_address_per_minute = 0
TOML
  if [ -n "${PG_PORT:-}" ]; then
    printf '[storage]\nengine = "postgres"\n\n[storage.postgres]\nurl = "postgres://kabar@127.0.0.1:%s/%s"\n' \
      "$PG_PORT" "$(new_database kabar)" >> "$dir/kabar.toml"
  fi
  "$KABAR" serve --config "$dir/kabar.toml" --listen "127.0.0.1:$KABAR_PORT" --data-dir "$dir/data" >"$dir/stdout.log" 2>"$dir/stderr.log" &
  SERVER_PID=$!
  wait_up "http://127.0.0.1:$KABAR_PORT"
}

wait_up() {
  for _ in $(seq 1 120); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/_matrix/client/versions', timeout=2)" "$1" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2; exit 1
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

# run SERVER SCENARIO ARGS...: one scenario on a fresh server; the JSON goes to
# $OUT/SERVER-NAME.REP.json, where NAME is $LABEL or the scenario.
run() {
  local server=$1 scenario=$2; shift 2
  if [ "$server" = synapse ]; then start_synapse; url="http://127.0.0.1:$SYNAPSE_PORT"; else start_kabar; url="http://127.0.0.1:$KABAR_PORT"; fi
  local args=("$@")
  if [ "$scenario" = idle ] || [ "$scenario" = surge ]; then args+=(--server-pid "$SERVER_PID"); fi
  local name="$server-${LABEL:-$scenario}.$REP"
  log "[$REP/$REPEAT] $server: $scenario ${args[*]}"
  # shellcheck disable=SC2086 # BENCH_FLAGS is a list of options
  if "$BENCH" --url "$url" --json ${BENCH_FLAGS:-} "$scenario" "${args[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    cat "$OUT/$name.json" >&2
  else
    echo "{\"scenario\": \"$scenario\", \"failed\": true}" > "$OUT/$name.json"
    tail -5 "$OUT/$name.log" >&2
  fi
  stop_server
}

# Repetitions go round all scenarios, so that a noisy minute on this shared
# machine touches one run of each rather than every run of one.
for REP in $(seq 1 "$REPEAT"); do
for s in $SCENARIOS; do
  case $s in
    versions)
      run synapse versions --seconds 5
      run kabar versions --seconds 5 ;;
    register)
      run synapse register --accounts "$REG_SYNAPSE" --concurrency "$REG_CONC"
      run kabar register --accounts "$REG_KABAR" --concurrency "$REG_CONC" ;;
    messages)
      run synapse messages --users "$MSG_USERS" --rooms "$MSG_ROOMS" --seconds "$MSG_SECONDS"
      run kabar messages --users "$MSG_USERS" --rooms "$MSG_ROOMS" --seconds "$MSG_SECONDS"
      # Kabar again at half its measured maximum rate, for the latency target.
      half=$(python3 -c "import json; r=json.load(open('$OUT/kabar-messages.$REP.json')); print(max(0.1, r.get('sends_per_sec', 0) / 2 / $MSG_USERS))")
      LABEL=messages-half run kabar messages --users "$MSG_USERS" --rooms "$MSG_ROOMS" --seconds "$MSG_SECONDS" --rate "$half" ;;
    todevice)
      run synapse todevice --pairs "$TD_PAIRS" --seconds "$TD_SECONDS"
      run kabar todevice --pairs "$TD_PAIRS" --seconds "$TD_SECONDS" ;;
    bigroom)
      run synapse bigroom --members "$BIG_SYNAPSE" --messages "$BIG_MESSAGES"
      run kabar bigroom --members "$BIG_KABAR" --messages "$BIG_MESSAGES" ;;
    idle)
      run synapse idle --clients "$IDLE_SYNAPSE" --users "$IDLE_USERS"
      run kabar idle --clients "$IDLE_KABAR" --users "$IDLE_USERS" --http2 --sources 8 ;;
    roomlist)
      run synapse roomlist --rooms "$RL_SYNAPSE" --requests "$RL_REQUESTS"
      run kabar roomlist --rooms "$RL_SYNAPSE" --requests "$RL_REQUESTS"
      LABEL=roomlist-big run kabar roomlist --rooms "$RL_KABAR" --requests "$RL_REQUESTS" ;;
    surge)
      # shellcheck disable=SC2086 # SURGE_PHASES is a list of flags
      run synapse surge --users "$SURGE_USERS" --rooms "$SURGE_ROOMS" --rate "$SURGE_RATE" $SURGE_PHASES
      # shellcheck disable=SC2086
      run kabar surge --users "$SURGE_USERS" --rooms "$SURGE_ROOMS" --rate "$SURGE_RATE" $SURGE_PHASES
      # shellcheck disable=SC2086
      LABEL=surge-busy run kabar surge --users "$SURGE_BUSY_USERS" --rooms "$SURGE_BUSY_ROOMS" --rate "$SURGE_BUSY_RATE" $SURGE_PHASES ;;
  esac
done
done

python3 "$ROOT/bench/table.py" "$OUT" "$SYNAPSE_VERSION" | tee "$OUT/table.md"
