#!/usr/bin/env bash
# Side-by-side create-payment benchmark of oncepay and its peer servers, in one run on one
# machine (only ratios measured in one run mean anything on a shared box), followed by the
# correctness check under load with retries.
#
#   bash load/compare.sh PEERS_DIR [DURATION]     # DURATION in seconds, `10` or `10s` (default)
#
# PEERS_DIR holds the peer servers: axum-memory/ and axum-sqlite/ (Rust, built here into
# PEER_TARGET_DIR) and, optionally, seed-fastapi/ (installed into a venv under /tmp; skipped with
# WITH_FASTAPI=0 or when it does not install within PIP_TIMEOUT_SECS).
#
# Each server runs alone on 127.0.0.1, gets a warm-up, then `wrk -t1 -c64 --latency` with
# load/create_payment.lua (a new key on every request); its CPU time comes from /proc/PID/stat.
# Pairs compared: oncepay memory vs axum-memory, and oncepay SQLite (synchronous=FULL, grouped
# commits) vs axum-sqlite with SYNC=FULL MAX_BATCH=256. Then oncepay-load drives oncepay (memory,
# then SQLite) with retries and reused keys and checks every answer and the server's state.
#
# Every server is stopped by the PID this script recorded, also on Ctrl-C; every step is bounded
# in time. Needs cargo, wrk, curl and ss; python3 for the FastAPI peer.
set -euo pipefail

usage="usage: bash load/compare.sh PEERS_DIR [DURATION]"
PEERS_DIR=$(realpath "${1:?$usage}")
DURATION_SECS=${2:-10}
DURATION_SECS=${DURATION_SECS%s}
if ! [[ $DURATION_SECS =~ ^[0-9]+$ ]] || (( DURATION_SECS < 1 || DURATION_SECS > 600 )); then
    echo "compare: the duration must be 1 to 600 seconds; $usage" >&2
    exit 2
fi

# wrk settings are those the peers' published figures were taken with.
CONNECTIONS=64
WARMUP_SECS=${WARMUP_SECS:-2}
# A wrk run that outlives its duration by this much is stuck: stop it. oncepay-load gets longer,
# for its lookups of thousands of keys after the load.
RUN_GRACE_SECS=60
CHECK_GRACE_SECS=300
BUILD_TIMEOUT_SECS=${BUILD_TIMEOUT_SECS:-1800}
PIP_TIMEOUT_SECS=${PIP_TIMEOUT_SECS:-300}
START_TIMEOUT_SECS=30
STOP_TIMEOUT_SECS=10
PEER_TARGET_DIR=${PEER_TARGET_DIR:-/tmp/oncepay-peers-target}
VENV_DIR=${VENV_DIR:-/tmp/oncepay-peers-venv}
WITH_FASTAPI=${WITH_FASTAPI:-1}
# The first port tried for the peers, which take a fixed port; oncepay picks its own.
PEER_PORT_FIRST=18400
API_KEY=sk_test_compare

for tool in cargo wrk curl ss; do
    command -v "$tool" > /dev/null || { echo "compare: $tool is missing" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
LUA_SCRIPT=$PWD/load/create_payment.lua
# The SQLite files live here; it must be a real disk for synchronous=FULL to cost an fsync.
WORK_DIR=$(mktemp -d /tmp/oncepay-compare.XXXXXX)

# The one server running at a time: its PID (to stop it by) and base URL.
SERVER_PID=""
SERVER_URL=""

# Stops the running server, if any: SIGTERM, then SIGKILL after STOP_TIMEOUT_SECS.
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2> /dev/null || true
    for _ in $(seq 1 $(( STOP_TIMEOUT_SECS * 10 ))); do
        kill -0 "$SERVER_PID" 2> /dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2> /dev/null || true
    wait "$SERVER_PID" 2> /dev/null || true
    SERVER_PID=""
}

cleanup() {
    stop_server
    rm -rf "$WORK_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prints the first port from PEER_PORT_FIRST that nothing listens on.
free_port() {
    local port
    for port in $(seq "$PEER_PORT_FIRST" $(( PEER_PORT_FIRST + 100 ))); do
        if [[ -z $(ss -Htln "sport = :$port") ]]; then
            echo "$port"
            return 0
        fi
    done
    echo "compare: no free port from $PEER_PORT_FIRST" >&2
    return 1
}

# Waits until the server SERVER_PID answers HTTP at $1 (any status will do).
wait_until_up() {
    local url=$1 name=$2
    for _ in $(seq 1 $(( START_TIMEOUT_SECS * 10 ))); do
        if ! kill -0 "$SERVER_PID" 2> /dev/null; then
            echo "compare: $name exited at start; its log:" >&2
            tail -n 20 "$WORK_DIR/$name.log" >&2
            return 1
        fi
        if curl -s -o /dev/null --max-time 1 "$url/"; then
            return 0
        fi
        sleep 0.1
    done
    echo "compare: $name did not answer within ${START_TIMEOUT_SECS}s" >&2
    return 1
}

# Starts oncepay on a port of its choosing with database $2; sets SERVER_PID and SERVER_URL.
start_oncepay() {
    local name=$1 database=$2 log="$WORK_DIR/$1.log" out="$WORK_DIR/$1.out"
    target/release/oncepay serve --listen 127.0.0.1:0 --database "$database" \
        --api-keys "compare:$API_KEY" > "$out" 2> "$log" &
    SERVER_PID=$!
    for _ in $(seq 1 $(( START_TIMEOUT_SECS * 10 ))); do
        SERVER_URL=$(sed -n 's/^oncepay listening on //p' "$out" | head -n 1)
        [[ -n $SERVER_URL ]] && return 0
        kill -0 "$SERVER_PID" 2> /dev/null || break
        sleep 0.1
    done
    echo "compare: $name did not start; its log:" >&2
    tail -n 20 "$log" >&2
    return 1
}

# Starts peer $1 listening on port $2 (also given to it as PORT) with the command that follows;
# sets SERVER_PID and SERVER_URL.
start_peer() {
    local name=$1 port=$2
    shift 2
    PORT=$port "$@" > "$WORK_DIR/$name.log" 2>&1 &
    SERVER_PID=$!
    SERVER_URL="http://127.0.0.1:$port"
    wait_until_up "$SERVER_URL" "$name"
}

# CPU seconds (user + system) the server SERVER_PID has used so far. In /proc/PID/stat, utime
# and stime are fields 14 and 15; the command name before them may hold spaces, so count from
# the last `)`.
server_cpu_secs() {
    local after_name
    after_name=$(sed 's/.*) //' "/proc/$SERVER_PID/stat")
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($12 + $13) / hz }' <<< "$after_name"
}

# Runs wrk against $1 for $2 seconds with key prefix $3; the output goes to $4.
run_wrk() {
    COMPARE_AUTH="Bearer $API_KEY" COMPARE_KEY_PREFIX=$3 \
        timeout $(( $2 + RUN_GRACE_SECS )) \
        wrk -t1 -c"$CONNECTIONS" -d"$2s" --latency -s "$LUA_SCRIPT" "$1" > "$4"
}

# Prints "requests req_per_sec p50_ms p99_ms not_created" from a wrk output file.
read_wrk() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return v / 1000
            if (v ~ /ms$/) return v + 0
            if (v ~ /s$/) return v * 1000
            return v
        }
        / requests in /   { requests = $1 }
        /^Requests\/sec:/ { rate = $2 }
        $1 == "50%"       { p50 = ms($2) }
        $1 == "99%"       { p99 = ms($2) }
        /^not created:/   { not_created = $3 }
        END { printf "%d %.0f %.2f %.2f %d\n", requests, rate, p50, p99, not_created }' "$1"
}

ROWS=()
declare -A RATE CPU_PER_1000

# Benchmarks the running server at $3 as row $1 (store $2); records the figures under $1.
measure() {
    local name=$1 store=$2 url=$3 out="$WORK_DIR/$1.wrk"
    run_wrk "$url" "$WARMUP_SECS" "warm-$name-$$" "$WORK_DIR/$name.warm" || true
    local cpu_before cpu_after requests rate p50 p99 not_created
    cpu_before=$(server_cpu_secs)
    run_wrk "$url" "$DURATION_SECS" "run-$name-$$" "$out"
    cpu_after=$(server_cpu_secs)
    stop_server

    read -r requests rate p50 p99 not_created < <(read_wrk "$out")
    RATE[$name]=$rate
    CPU_PER_1000[$name]=$(awk -v a="$cpu_after" -v b="$cpu_before" -v n="$requests" \
        'BEGIN { if (n > 0) printf "%.1f", (a - b) * 1e6 / n; else print "-" }')
    ROWS+=("$name | $store | $rate | $p50 | $p99 | ${CPU_PER_1000[$name]} | $not_created")
    echo "compare: $name: $rate req/s, p99 $p99 ms, $not_created not created" >&2
}

# Prints "x% req/s, y.yx CPU" for oncepay row $1 against peer row $2.
ratio() {
    awk -v r="${RATE[$1]:-0}" -v pr="${RATE[$2]:-0}" -v c="${CPU_PER_1000[$1]:-0}" \
        -v pc="${CPU_PER_1000[$2]:-0}" \
        'BEGIN { if (pr > 0 && pc > 0) printf "%.0f%% of req/s, %.2fx CPU per request", 100 * r / pr, c / pc
                 else printf "-" }'
}

build() {
    echo "compare: building oncepay and oncepay-load (release)" >&2
    timeout "$BUILD_TIMEOUT_SECS" cargo build --release --quiet -p oncepay -p oncepay-load
    local peer
    for peer in axum-memory axum-sqlite; do
        echo "compare: building the $peer peer into $PEER_TARGET_DIR" >&2
        CARGO_TARGET_DIR=$PEER_TARGET_DIR timeout "$BUILD_TIMEOUT_SECS" cargo build --release \
            --quiet --locked --manifest-path "$PEERS_DIR/$peer/Cargo.toml"
    done
}

# Installs the FastAPI peer into VENV_DIR; fails (and the peer is skipped) if that takes long.
install_fastapi() {
    [[ $WITH_FASTAPI == 1 ]] || return 1
    command -v python3 > /dev/null || return 1
    [[ -x $VENV_DIR/bin/uvicorn ]] && return 0
    echo "compare: installing the FastAPI peer into $VENV_DIR" >&2
    python3 -m venv "$VENV_DIR" \
        && timeout "$PIP_TIMEOUT_SECS" "$VENV_DIR/bin/pip" install --quiet \
            -r "$PEERS_DIR/seed-fastapi/requirements.txt" > "$WORK_DIR/pip.log" 2>&1
}

benchmark() {
    local peer_bin=$PEER_TARGET_DIR/release
    start_peer axum-memory "$(free_port)" "$peer_bin/peer-axum-memory"
    measure axum-memory memory "$SERVER_URL"
    start_oncepay oncepay-memory memory://
    measure oncepay-memory memory "$SERVER_URL"

    start_peer axum-sqlite "$(free_port)" env STORE=sqlite SYNC=FULL MAX_BATCH=256 \
        DB_PATH="$WORK_DIR/peer.db" "$peer_bin/peer-axum-sqlite"
    measure axum-sqlite "SQLite FULL, batch 256" "$SERVER_URL"
    start_oncepay oncepay-sqlite "sqlite://$WORK_DIR/oncepay.db"
    measure oncepay-sqlite "SQLite FULL, grouped" "$SERVER_URL"

    if install_fastapi; then
        local port
        port=$(free_port)
        start_peer seed-fastapi "$port" "$VENV_DIR/bin/python" -m uvicorn app.main:app \
            --app-dir "$PEERS_DIR/seed-fastapi" --host 127.0.0.1 --port "$port"
        measure seed-fastapi "dict, 1 worker" "$SERVER_URL"
    else
        echo "compare: the FastAPI peer is skipped (WITH_FASTAPI=0, no python3, or pip failed)" >&2
    fi
}

print_table() {
    echo "| server | store | req/s | p50 ms | p99 ms | CPU ms / 1000 req | non-201 | oncepay vs peer |"
    echo "|---|---|---|---|---|---|---|---|"
    local row name
    for row in "${ROWS[@]}"; do
        name=${row%% *}
        case $name in
            oncepay-memory) echo "| $row | $(ratio oncepay-memory axum-memory) |" ;;
            oncepay-sqlite) echo "| $row | $(ratio oncepay-sqlite axum-sqlite) |" ;;
            *) echo "| $row | |" ;;
        esac
    done
}

# Drives oncepay on database $2 with oncepay-load; returns its exit code.
check_correctness() {
    local name=$1 database=$2 status=0
    start_oncepay "$name" "$database" || return 1
    timeout $(( DURATION_SECS + CHECK_GRACE_SECS )) target/release/oncepay-load \
        --url "$SERVER_URL" --api-key "$API_KEY" --concurrency 32 --duration "${DURATION_SECS}s" \
        --retry-ratio 0.2 --mismatch-ratio 0.02 || status=$?
    if (( status == 124 )); then
        echo "compare: oncepay-load did not finish within $(( DURATION_SECS + CHECK_GRACE_SECS ))s" >&2
        echo "oncepay-load timed out: no verdict."
    fi
    stop_server
    return "$status"
}

build
echo "# Create-payment benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "$(nproc) cores (load average $(cut -d' ' -f1-3 /proc/loadavg) at the start)," \
    "$(rustc --version | cut -d' ' -f1-2), wrk -t1 -c$CONNECTIONS -d${DURATION_SECS}s after a" \
    "${WARMUP_SECS}s warm-up, one server at a time, a new key per request."
echo
benchmark
print_table
echo

verdicts=0
echo "## Correctness under load (oncepay-load, 20% retries, 2% reused keys)"
echo
echo "oncepay, memory store:"
check_correctness load-memory memory:// || verdicts=1
echo
echo "oncepay, SQLite store:"
check_correctness load-sqlite "sqlite://$WORK_DIR/load.db" || verdicts=1
exit "$verdicts"
