#!/usr/bin/env bash
# Create-payment throughput of oncepay on PostgreSQL, with one process and with three processes
# on one database, next to what PostgreSQL alone commits at the same client count (pgbench, one
# single-row insert per transaction). Builds the release binary, makes a fresh database, drives
# the servers with wrk and load/post_payments.lua, prints a table, and drops the database.
#
#   load/pg_throughput.sh                     # 10 s per run, 48 connections
#   DURATION_SECS=30 CONNECTIONS=96 load/pg_throughput.sh
#
# Needs wrk (Debian: apt-get update && apt-get install -y wrk), psql and pgbench, and a
# PostgreSQL server reachable at ONCEPAY_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/test)
# whose role may create databases. Only processes this script starts are stopped.
set -euo pipefail

ADMIN_URL=${ONCEPAY_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
DURATION_SECS=${DURATION_SECS:-10}
WARMUP_SECS=${WARMUP_SECS:-2}
CONNECTIONS=${CONNECTIONS:-48}
# The pool per process: enough connections for its share of the clients.
POOL_SIZE=${POOL_SIZE:-16}

for tool in wrk psql pgbench cargo; do
    if ! command -v "$tool" > /dev/null; then
        echo "pg_throughput: $tool is missing (wrk: apt-get update && apt-get install -y wrk)" >&2
        exit 1
    fi
done
if (( CONNECTIONS % 3 != 0 )); then
    echo "pg_throughput: CONNECTIONS must be a multiple of 3 to split it over three processes" >&2
    exit 1
fi

cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=target/release/oncepay
WORK=$(mktemp -d)
DB="oncepay_load_$$_${RANDOM}"
DB_URL="${ADMIN_URL%/*}/${DB}"
SERVER_PIDS=()
SERVER_URLS=()

stop_servers() {
    for pid in "${SERVER_PIDS[@]}"; do
        kill "$pid" 2> /dev/null || true
        wait "$pid" 2> /dev/null || true
    done
    SERVER_PIDS=()
}

cleanup() {
    stop_servers
    psql "$ADMIN_URL" -qc "drop database if exists ${DB} with (force)" > /dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts server number $1 and waits (up to 30 s) until it listens; appends its base URL to
# SERVER_URLS. Not meant for a subshell: the caller must see SERVER_PIDS grow to stop it later.
start_server() {
    local n=$1 out="$WORK/server-$1.out"
    "$BIN" serve --listen 127.0.0.1:0 --database "$DB_URL" --db-pool-size "$POOL_SIZE" \
        --api-keys acme:sk_test_acme > "$out" 2> "$WORK/server-$n.err" &
    SERVER_PIDS+=($!)
    for _ in $(seq 1 300); do
        if grep -q '^oncepay listening on ' "$out"; then
            SERVER_URLS+=("$(sed -n 's/^oncepay listening on //p' "$out" | head -n 1)")
            return 0
        fi
        sleep 0.1
    done
    echo "pg_throughput: server $n did not start; see $WORK/server-$n.err" >&2
    return 1
}

# CPU seconds (user + system) the started servers have used so far.
servers_cpu_secs() {
    local ticks=0 pid fields
    for pid in "${SERVER_PIDS[@]}"; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the command name's closing parenthesis.
        fields=$(sed 's/^.*) //' "/proc/$pid/stat")
        ticks=$(( ticks + $(echo "$fields" | awk '{print $12 + $13}') ))
    done
    awk -v ticks="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", ticks / hz }'
}

# Runs wrk against every URL at once, splitting the connections, for $1 seconds; prints
# "requests req_per_sec p50_ms p99_ms non_201".
drive() {
    local secs=$1 tag=$2
    shift 2
    local per_server=$(( CONNECTIONS / $# )) i=0 url wrk_pids=()
    for url in "$@"; do
        i=$(( i + 1 ))
        ONCEPAY_LOAD_KEY_PREFIX="${tag}-${i}-$$" timeout $(( secs + 30 )) \
            wrk -t1 -c"$per_server" -d"${secs}s" --latency -s load/post_payments.lua "$url" \
            > "$WORK/wrk-$tag-$i.out" &
        wrk_pids+=($!)
    done
    # Only the wrk processes: a bare `wait` would also wait for the servers.
    wait "${wrk_pids[@]}"
    cat "$WORK"/wrk-"$tag"-*.out | awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0;
                         if (v ~ /s$/) return v * 1000; return v }
        /requests in/          { requests += $1 }
        /^Requests\/sec:/      { rate += $2 }
        $1 == "50%"            { if (ms($2) > p50) p50 = ms($2) }
        $1 == "99%"            { if (ms($2) > p99) p99 = ms($2) }
        /^non-201 responses:/  { bad += $3 }
        END { printf "%d %.0f %.2f %.2f %d\n", requests, rate, p50, p99, bad }'
}

# Measures one configuration of $1 servers; prints a table row.
measure() {
    local count=$1 cpu_before cpu_after
    psql "$DB_URL" -qc "truncate reward_entries, refunds, payments, idempotency_records" > /dev/null
    SERVER_URLS=()
    for n in $(seq 1 "$count"); do
        start_server "$n"
    done
    drive "$WARMUP_SECS" "warm${count}" "${SERVER_URLS[@]}" > /dev/null
    cpu_before=$(servers_cpu_secs)
    read -r requests rate p50 p99 bad < <(drive "$DURATION_SECS" "run${count}" "${SERVER_URLS[@]}")
    cpu_after=$(servers_cpu_secs)
    stop_servers
    local cpu_ms_per_req
    cpu_ms_per_req=$(awk -v a="$cpu_after" -v b="$cpu_before" -v n="$requests" \
        'BEGIN { printf "%.3f", (a - b) * 1000 / n }')
    printf '| oncepay x%d (wrk -c%d) | %d | %s | %s | %s | %s | %s |\n' \
        "$count" "$CONNECTIONS" "$CONNECTIONS" "$rate" "$p50" "$p99" "$bad" "$cpu_ms_per_req"
}

psql "$ADMIN_URL" -qc "create database ${DB}"
"$BIN" migrate --database "$DB_URL" 2> "$WORK/migrate.err"

echo "PostgreSQL: $(psql "$DB_URL" -Atc 'show server_version'), $(nproc) cores," \
    "${DURATION_SECS}s per run, ${CONNECTIONS} connections"
echo
echo "| what | clients | req/s | p50 ms | p99 ms | non-201 | oncepay CPU ms/req |"
echo "|---|---|---|---|---|---|---|"
measure 1
measure 3

# PostgreSQL alone: one single-row insert per transaction, as many clients as wrk had.
psql "$DB_URL" -qc "create table bench_insert (id bigint generated always as identity primary key, v text not null)"
echo "insert into bench_insert (v) values ('x');" > "$WORK/insert.sql"
if ! pgbench -n -M prepared -c "$CONNECTIONS" -j 2 -T "$DURATION_SECS" -f "$WORK/insert.sql" \
    "$DB_URL" > "$WORK/pgbench.out" 2>&1; then
    cat "$WORK/pgbench.out" >&2
    exit 1
fi
tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$WORK/pgbench.out" | head -n 1)
latency=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$WORK/pgbench.out")
printf '| pgbench single-row insert | %d | %.0f | %s (average) | - | - | - |\n' \
    "$CONNECTIONS" "$tps" "$latency"
echo
echo "req/s sums the wrk processes (one per oncepay process); p50 and p99 are the worst of them;"
echo "CPU is the user and system time of the oncepay processes alone, per request."
