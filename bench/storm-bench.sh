#!/usr/bin/env bash
# Reconnect storm benchmark (the seed's situation: the ELB resets every connection at once and
# every client reconnects): warren-broker vs RabbitMQ (Debian's rabbitmq-server package), both
# behind the same warren-lb, driven by the same warren-storm, in one run on this machine, loopback
# only.
#
#   bench/storm-bench.sh                  # 1,000 clients, 3 storms per broker, about 2 minutes
#   CLIENTS=100 STORMS=1 bench/storm-bench.sh   # quick check of the script itself
#
# warren-lb runs one listener per broker ("rabbitmq", "warren"; PROXY protocol off, so both brokers
# see the balancer's loopback address and guest may log in). Per broker, warren-storm connects
# CLIENTS clients through its listener (heartbeat HEARTBEAT s, one channel, queue.declare, basic.qos,
# basic.consume on a shared queue, or one auto-delete queue each with QUEUES=per-client), lets them
# idle, then STORMS times resets every connection of the listener at once through warren-lb's
# admin API (POST /listeners/{name}/reset, an RST to both sides) and times how long until every
# client has its consume-ok again; each client reconnects at once, as kombu or pika with retry do.
# Figures (medians over the storms):
#   all consuming s        from the reset until the last client's consume-ok
#   client p50 / p99 ms    each client's time from the reset to its consume-ok
#   broker CPU µs/handshake  broker CPU (utime + stime of its process tree: RabbitMQ's beam.smp and
#                          its children) from the reset until the last consume-ok + 1 s, divided
#                          by the handshakes (connection + channel + declare + qos + consume)
#   RSS KiB/conn           (broker RSS with every client idle - RSS before any) / CLIENTS
#   LB CPU µs/handshake    warren-lb's CPU over the same window (to see whether it limits)
# RabbitMQ runs as a foreground node of our own (temp dirs, free ports, no plugins); warren-broker
# and warren-lb run from the release build. If warren-broker does not build or start, this is
# reported and RabbitMQ is still measured. Prints a table and writes JSON under $RESULTS. Everything
# it starts is stopped on exit.
#
# Environment (all optional):
#   CLIENTS=1000  HEARTBEAT=10  STORMS=3  QUEUES=shared|per-client  SETTLE=3 (s)
#   BROKERS="rabbitmq warren"   add "base" to measure a second warren-broker build side by side
#   BASE_BIN=path         that build (before/after comparisons)
#   RESULTS=dir           where JSON goes (default $CARGO_TARGET_DIR/storm-bench/<UTC time>)
#   CARGO_TARGET_DIR      where the release binaries are built (default target/)
#   SKIP_BUILD=1          use the binaries already built
#   WARREN_BIN, LB_BIN, STORM_BIN   binaries to run instead of the release build's
#   WARREN_ARGS="..."     extra warren-broker arguments
#   LB_THREADS            warren-lb worker threads (default: its own, one per CPU)
#   STOP_SYSTEM_RABBITMQ=1  stop a running system rabbitmq-server service first (default 1)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLIENTS=${CLIENTS:-1000}
HEARTBEAT=${HEARTBEAT:-10}
STORMS=${STORMS:-3}
QUEUES=${QUEUES:-shared}
SETTLE=${SETTLE:-3}
BROKERS=${BROKERS:-rabbitmq warren}
STOP_SYSTEM_RABBITMQ=${STOP_SYSTEM_RABBITMQ:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$TARGET_DIR/storm-bench/$STAMP}
BIN=$TARGET_DIR/release
RABBIT_SBIN=${RABBIT_SBIN:-/usr/lib/rabbitmq/bin}

BENCH_NAME="storm-bench"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

require_tools jq ss timeout python3 epmd

case $QUEUES in
    shared) QUEUE_FLAG=() ;;
    per-client) QUEUE_FLAG=(--queue-per-client) ;;
    *) die "QUEUES must be shared or per-client" ;;
esac

# Every client holds a socket in warren-storm, two in warren-lb and one in the broker.
need_fds=$((3 * CLIENTS + 1024))
if (($(ulimit -n) < need_fds)); then
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    (($(ulimit -n) >= need_fds)) || die "ulimit -n is $(ulimit -n), $need_fds needed (raise the hard limit)"
fi

# ---------------------------------------------------------------- cleanup: stop what we started
begin_run storm-bench

mkdir -p "$RESULTS"

# ---------------------------------------------------------------- build
build_release warren-broker warren-lb
STORM=${STORM_BIN:-$BIN/warren-storm}
LB=${LB_BIN:-$BIN/warren-lb}
WARREN_BIN=${WARREN_BIN:-$BIN/warren-broker}
[[ -x $STORM ]] || die "$STORM missing (build it or unset SKIP_BUILD)"
[[ -x $LB ]] || die "$LB missing (build it or unset SKIP_BUILD)"
if [[ $WARREN_OK == 1 && ! -x $WARREN_BIN ]]; then
    WARREN_OK=0
    WARREN_WHY="binary missing"
fi

# ---------------------------------------------------------------- RabbitMQ
start_rabbitmq() { start_rabbitmq_node storm; }

# ---------------------------------------------------------------- warren-broker
# start_warren LABEL BINARY: sets <LABEL>_ADDR and <LABEL>_PID, or clears <LABEL>_OK and says why.
start_warren() {
    local label=$1 bin=$2 lower=${1,,}
    local args=(--amqp 127.0.0.1:0 --data-dir "$WORK/$lower-data")
    local help flag
    help=$("$bin" --help 2>&1 || true)
    for flag in --mgmt --prometheus; do
        grep -q -- "$flag" <<<"$help" && args+=("$flag" 127.0.0.1:0)
    done
    # shellcheck disable=SC2206
    args+=(${WARREN_ARGS:-})
    log "starting $lower: $bin ${args[*]}"
    : >"$WORK/$lower.log"
    RUST_LOG=${RUST_LOG:-warn} "$bin" "${args[@]}" 2>>"$WORK/$lower.log" >/dev/null &
    local pid=$!
    PIDS+=("$pid")
    printf -v "${label}_PID" '%s' "$pid"
    local i addr
    for ((i = 0; i < 100; i++)); do
        addr=$(sed -n 's/.*listening proto=amqp addr=\([^ ]*\).*/\1/p' "$WORK/$lower.log" | head -1 || true)
        if [[ -n $addr ]]; then
            printf -v "${label}_ADDR" '%s' "$addr"
            log "$lower up on $addr, pid $pid"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.2
    done
    tail -20 "$WORK/$lower.log" >&2
    printf -v "${label}_OK" '%s' 0
    printf -v "${label}_WHY" '%s' "does not start (no 'listening proto=amqp' line)"
    log "$lower does not start: not measured"
    return 0
}

WARREN_PID=""
[[ " $BROKERS " == *" rabbitmq "* ]] && start_rabbitmq
if [[ " $BROKERS " == *" warren "* ]]; then
    # The address line is logged at info.
    [[ $WARREN_OK == 1 ]] && RUST_LOG=info start_warren WARREN "$WARREN_BIN"
else
    WARREN_OK=0
    WARREN_WHY="not selected"
fi
BASE_OK=0
BASE_WHY="not selected"
BASE_PID=""
if [[ " $BROKERS " == *" base "* ]]; then
    if [[ -x ${BASE_BIN:-} ]]; then
        BASE_OK=1
        RUST_LOG=info start_warren BASE "$BASE_BIN"
    else
        BASE_WHY="BASE_BIN not set or not executable"
        log "base: $BASE_WHY"
    fi
fi

# ---------------------------------------------------------------- warren-lb
ADMIN_PORT=$(free_port)
declare -A LB_PORT=()
{
    echo "[admin]"
    echo "listen = \"127.0.0.1:$ADMIN_PORT\""
    if [[ -n ${LB_THREADS:-} ]]; then
        echo "[runtime]"
        echo "threads = $LB_THREADS"
    fi
    for b in rabbitmq warren base; do
        case $b in
            rabbitmq) [[ -n $RABBIT_PID ]] || continue; addr=$RABBIT_ADDR ;;
            warren) [[ $WARREN_OK == 1 ]] || continue; addr=$WARREN_ADDR ;;
            base) [[ $BASE_OK == 1 ]] || continue; addr=$BASE_ADDR ;;
        esac
        LB_PORT[$b]=$(free_port)
        echo
        echo "[[listener]]"
        echo "name = \"$b\""
        echo "bind = \"127.0.0.1:${LB_PORT[$b]}\""
        echo "backends = [\"$addr\"]"
        echo "max_connections = $((CLIENTS * 2 + 100))"
        echo "proxy_protocol = \"off\""
    done
} >"$WORK/lb.toml"
log "starting warren-lb (admin 127.0.0.1:$ADMIN_PORT)"
RUST_LOG=warn "$LB" --config "$WORK/lb.toml" >"$WORK/lb.log" 2>&1 &
LB_PID=$!
PIDS+=("$LB_PID")
wait_listen "$ADMIN_PORT" 100 || { tail -20 "$WORK/lb.log" >&2; die "warren-lb did not start"; }

# ---------------------------------------------------------------- storms
run_one() { # broker
    local broker=$1 pid out
    case $broker in
        rabbitmq) [[ -n $RABBIT_PID ]] || return 0; pid=$RABBIT_PID ;;
        warren) [[ $WARREN_OK == 1 ]] || return 0; pid=$WARREN_PID ;;
        base) [[ $BASE_OK == 1 ]] || return 0; pid=$BASE_PID ;;
    esac
    out=$RESULTS/storm-$broker.json
    local l0 l1
    l0=$(load)
    log "$broker: warren-storm --clients $CLIENTS --heartbeat $HEARTBEAT --storms $STORMS ${QUEUE_FLAG[*]}  [load $l0]"
    if timeout $((STORMS * 200 + 300)) "$STORM" --uri "amqp://guest:guest@127.0.0.1:${LB_PORT[$broker]}/%2f" \
        --clients "$CLIENTS" --heartbeat "$HEARTBEAT" --storms "$STORMS" --settle "$SETTLE" \
        "${QUEUE_FLAG[@]}" --queue "storm-$QUEUES" \
        --lb-admin "127.0.0.1:$ADMIN_PORT" --lb-listener "$broker" --lb-pid "$LB_PID" \
        --broker-pid "$pid" --label "$broker" --json-out "$out.tmp" >/dev/null 2>"$WORK/storm-$broker.err"; then
        :
    else
        log "warren-storm failed on $broker"
    fi
    sed 's/^/    /' "$WORK/storm-$broker.err" >&2
    l1=$(load)
    if [[ -s $out.tmp ]]; then
        jq --arg b "$broker" --arg l0 "$l0" --arg l1 "$l1" \
            '. + {broker: $b, loadavg_before: $l0, loadavg_after: $l1}' "$out.tmp" >"$out"
        rm -f "$out.tmp"
    fi
    sleep 2
}

for b in $BROKERS; do run_one "$b"; done

# ---------------------------------------------------------------- report
CPU_MODEL=$(cpu_model)
MEM_GIB=$(mem_gib)
shopt -s nullglob
runs=("$RESULTS"/storm-*.json)
((${#runs[@]} > 0)) || die "no results"
jq -s --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg cpu "$CPU_MODEL" --arg nproc "$(nproc)" \
    --arg mem "$MEM_GIB" --arg rabbit "${RABBIT_VERSION:-}" \
    --arg warren_ok "$WARREN_OK" --arg warren_why "$WARREN_WHY" \
    --arg base "$([[ $BASE_OK == 1 ]] && echo "measured: $BASE_BIN" || echo "not measured: $BASE_WHY")" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    '{date: $date, machine: {cpu: $cpu, nproc: ($nproc | tonumber), mem_gib: ($mem | tonumber)},
      rabbitmq_version: $rabbit, commit: $commit,
      warren_broker: (if $warren_ok == "1" then "measured" else "not measured: " + $warren_why end),
      base_broker: $base, runs: .}' "${runs[@]}" >"$RESULTS/results.json"

TABLE=$(jq -r '
  def f(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  def median: map(select(. != null)) | sort
    | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  .runs[] | [.broker, (.clients | tostring), (.all_consuming_s | f(3)),
     "\(.client_p50_ms | f(0)) / \(.client_p99_ms | f(0))",
     (.broker_cpu_us_per_handshake | f(0)),
     (.broker_rss_per_conn_kib | f(1)),
     (if .broker_rss_idle_kib == null then "-" else (.broker_rss_idle_kib / 1024 | f(0)) end),
     (.broker_idle_core_percent | f(1)),
     ([.storms[] | select(.handshakes > 0) | .lb_cpu_s * 1e6 / .handshakes] | median | f(0)),
     ([.storms[] | select(.handshakes > 0) | .driver_cpu_s * 1e6 / .handshakes] | median | f(0)),
     ([.storms[].failed_attempts] | add // 0 | tostring),
     (if (.errors | length) == 0 then "ok" else (.errors | join("; ")) end),
     .loadavg_before]
  | @tsv' "$RESULTS/results.json")

{
    echo "| broker | clients | all consuming s | client p50 / p99 ms | broker CPU µs/handshake | broker RSS KiB/conn | broker RSS idle MiB | broker idle CPU % | warren-lb CPU µs/handshake | driver CPU µs/handshake | failed attempts | run | load avg before |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"
    while IFS=$'\t' read -r -a row; do
        [[ ${#row[@]} -gt 0 ]] || continue
        printf '| %s |\n' "$(printf '%s | ' "${row[@]}" | sed 's/ | $//')"
    done <<<"$TABLE"
} >"$RESULTS/table.md"

{
    echo
    echo "warren-storm through warren-lb, $CLIENTS clients, heartbeat ${HEARTBEAT}s, $QUEUES queue(s), $STORMS storms (medians), $(nproc) CPUs ($CPU_MODEL), RabbitMQ ${RABBIT_VERSION:-?}, warren-broker: $([[ $WARREN_OK == 1 ]] && echo measured || echo "NOT MEASURED ($WARREN_WHY)")"
    printf '%s\n' "broker	clients	all consuming s	client p50/p99 ms	broker CPU µs/hs	RSS KiB/conn	RSS idle MiB	idle CPU %	LB CPU µs/hs	driver CPU µs/hs	failed	run	load before" \
        "$TABLE" | column -t -s $'\t'
    echo
    echo "JSON: $RESULTS/results.json"
} | tee "$RESULTS/table.txt"
