#!/usr/bin/env bash
# Broker benchmark: warren-broker vs RabbitMQ (Debian's rabbitmq-server package), side by side in one
# run on this machine, loopback only, both driven by warren-perf with --broker-pid.
#
#   bench/broker-bench.sh                 # full run, about 2.5 minutes
#   DURATION=3 bench/broker-bench.sh      # quick check of the script itself
#
# Scenarios (1 producer, 1 consumer, one connection each):
#   transient   16-byte transient messages, no confirms, auto-ack (throughput, broker CPU per message)
#   confirm100  1 KiB persistent messages to a durable queue, confirms with 100 in flight, manual
#               acks (prefetch 500, one multiple-ack per 50)
#   confirm1    1 KiB persistent messages, one confirmed message in flight (py-amqp/Celery pattern),
#               auto-ack consumer: confirm round trip
#   rate20k     as transient but at 20,000 msg/s, which both brokers sustain: end-to-end latency
#               without a backlog (unlimited runs build a queue, so their latency is queueing delay)
#   persist-cC-xP  1 KiB persistent messages to a durable queue, C confirms in flight per producer
#               (1, 10, 100), P producers (1, 4), one consumer with manual acks (prefetch 500, one
#               multiple-ack per 50): the disk path. Also reports fsyncs per second: warren-broker's
#               own sync counter (debug log line "store: sync count"); RabbitMQ's only with
#               FSYNC_STRACE=1 (strace -c on the beam process for the run, which slows it down), else
#               "not measured".
# RabbitMQ runs as a foreground node of our own (temp dirs, free ports, no plugins, so no management
# plugin); warren-broker runs from the release build. If warren-broker does not build or start, this is
# reported and RabbitMQ is still measured. Prints a table and writes JSON under $RESULTS. Everything it
# starts is stopped on exit.
#
# Environment (all optional):
#   DURATION=12           seconds per scenario and broker
#   SCENARIOS="transient rate20k confirm100 confirm1"
#             (persistent set: SCENARIOS="persist-c1-x1 persist-c10-x1 persist-c100-x1 persist-c1-x4
#             persist-c10-x4 persist-c100-x4", or SCENARIOS=persist for all six)
#   BROKERS="rabbitmq warren"   add "base" to measure a second warren-broker build side by side
#   BASE_BIN=path         that build (for before/after comparisons, e.g. a release build of the
#                         commit before a change: `git worktree add ../base REV` and
#                         `CARGO_TARGET_DIR=../target-base cargo build --release -p warren-broker`)
#   ROUNDS=1              repeat every scenario, brokers alternating (all rounds kept, table = medians)
#   PERF_THREADS=1        warren-perf threads (1 = everything on one thread, least client CPU)
#   RESULTS=dir           where JSON goes (default $CARGO_TARGET_DIR/broker-bench/<UTC time>)
#   CARGO_TARGET_DIR      where the release binaries are built (default target/)
#   SKIP_BUILD=1          use the binaries already built
#   WARREN_ARGS="..."     extra warren-broker arguments
#   STOP_SYSTEM_RABBITMQ=1  stop a running system rabbitmq-server service first (default 1)
#   BENCH_NICE=-10        run brokers and warren-perf at this nice value (negative: root only), so that
#                         other work on the machine disturbs the figures less; both brokers get the same.
#                         With scheduler autogroups on, start the script with `setsid --wait` so that the
#                         value also applies to its session's autogroup
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-12}
SCENARIOS=${SCENARIOS:-transient rate20k confirm100 confirm1}
if [[ $SCENARIOS == persist ]]; then
    SCENARIOS="persist-c1-x1 persist-c10-x1 persist-c100-x1 persist-c1-x4 persist-c10-x4 persist-c100-x4"
fi
FSYNC_STRACE=${FSYNC_STRACE:-0}
BROKERS=${BROKERS:-rabbitmq warren}
ROUNDS=${ROUNDS:-1}
PERF_THREADS=${PERF_THREADS:-1}
STOP_SYSTEM_RABBITMQ=${STOP_SYSTEM_RABBITMQ:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$TARGET_DIR/broker-bench/$STAMP}
BIN=$TARGET_DIR/release
RABBIT_SBIN=${RABBIT_SBIN:-/usr/lib/rabbitmq/bin}

BENCH_NAME="broker-bench"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

require_tools jq ss timeout python3

# ---------------------------------------------------------------- cleanup: stop what we started
begin_run broker-bench

mkdir -p "$RESULTS"

# ---------------------------------------------------------------- build
build_release warren-broker
PERF=$BIN/warren-perf
[[ -x $PERF ]] || die "$PERF missing (build it or unset SKIP_BUILD)"
if [[ $WARREN_OK == 1 && ! -x $BIN/warren-broker ]]; then
    WARREN_OK=0
    WARREN_WHY="binary missing"
fi

# ---------------------------------------------------------------- priority (after the build)
apply_bench_nice

# ---------------------------------------------------------------- RabbitMQ
start_rabbitmq() { start_rabbitmq_node bench; }

# ---------------------------------------------------------------- warren-broker
# start_warren LABEL BINARY: sets <LABEL>_URI and <LABEL>_PID (LABEL: WARREN or BASE), or clears
# <LABEL>_OK and says why.
start_warren() {
    local label=$1 bin=$2 lower=${1,,}
    local args=(--amqp 127.0.0.1:0)
    local help flag
    help=$("$bin" --help 2>&1 || true)
    # Keep its other listeners off the default ports when it has them. No --cluster-listen: this
    # is a single node, standalone (clustering is off without it, and the broker refuses it
    # without --cluster-secret-file).
    for flag in --mgmt --prometheus; do
        grep -q -- "$flag" <<<"$help" && args+=("$flag" 127.0.0.1:0)
    done
    grep -q -- "--data-dir" <<<"$help" && args+=(--data-dir "$WORK/$lower-data")
    # shellcheck disable=SC2206
    args+=(${WARREN_ARGS:-})
    log "starting $lower: $bin ${args[*]}"
    : >"$WORK/$lower.log"
    # The store's sync counter is a debug line; everything else stays at info.
    RUST_LOG=${RUST_LOG:-info,warren_broker::store=debug} \
        "$bin" "${args[@]}" 2>>"$WORK/$lower.log" >/dev/null &
    local pid=$!
    PIDS+=("$pid")
    printf -v "${label}_PID" '%s' "$pid"
    local i addr
    for ((i = 0; i < 100; i++)); do
        addr=$(sed -n 's/.*listening proto=amqp addr=\([^ ]*\).*/\1/p' "$WORK/$lower.log" | head -1 || true)
        if [[ -n $addr ]]; then
            printf -v "${label}_URI" '%s' "amqp://guest:guest@$addr/%2f"
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

[[ " $BROKERS " == *" rabbitmq "* ]] && start_rabbitmq
if [[ " $BROKERS " == *" warren "* ]]; then
    [[ $WARREN_OK == 1 ]] && start_warren WARREN "$BIN/warren-broker"
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
        start_warren BASE "$BASE_BIN"
    else
        BASE_WHY="BASE_BIN not set or not executable"
        log "base: $BASE_WHY"
    fi
fi

# ---------------------------------------------------------------- idle cost
# Both brokers stay up for the whole run, so what one costs while idle is charged to the machine
# during the other's runs: measure it (percent of one core over 3 s, both at once).
HZ=$(getconf CLK_TCK)
IDLE_RABBIT=null
IDLE_WARREN=null
sleep 2
r0=$([[ -n $RABBIT_PID ]] && cpu_ticks "$RABBIT_PID" || echo 0)
w0=$([[ $WARREN_OK == 1 ]] && cpu_ticks "$WARREN_PID" || echo 0)
sleep 3
[[ -n $RABBIT_PID ]] && IDLE_RABBIT=$(awk -v a="$r0" -v b="$(cpu_ticks "$RABBIT_PID")" -v hz="$HZ" 'BEGIN {printf "%.1f", (b - a) * 100 / hz / 3}')
[[ $WARREN_OK == 1 ]] && IDLE_WARREN=$(awk -v a="$w0" -v b="$(cpu_ticks "$WARREN_PID")" -v hz="$HZ" 'BEGIN {printf "%.1f", (b - a) * 100 / hz / 3}')
log "idle CPU (% of a core): RabbitMQ $IDLE_RABBIT, warren-broker $IDLE_WARREN"

# ---------------------------------------------------------------- scenarios
scenario_args() {
    case $1 in
        transient) echo "-x 1 -y 1 -s 16 -a" ;;
        rate20k) echo "-x 1 -y 1 -s 16 -a -r 20000" ;;
        confirm100) echo "-x 1 -y 1 -s 1024 -f persistent -c 100 -q 500 --multi-ack-every 50" ;;
        confirm1) echo "-x 1 -y 1 -s 1024 -f persistent -c 1 -a" ;;
        persist-c*-x*)
            local c=${1#persist-c} x
            x=${c#*-x}
            c=${c%-x*}
            echo "-x $x -y 1 -s 1024 -f persistent -c $c -q 500 --multi-ack-every 50"
            ;;
        *) die "unknown scenario $1" ;;
    esac
}

# Latest value of a warren-broker's store sync counter (0 before the first sync): warren or base.
warren_syncs() {
    sed -n 's/.*syncs=\([0-9]*\).*store: sync count.*/\1/p; s/.*store: sync count.*syncs=\([0-9]*\).*/\1/p' \
        "$WORK/$1.log" | tail -1 | grep . || echo 0
}

run_one() { # broker scenario round
    local broker=$1 sc=$2 round=$3 uri pid out
    case $broker in
        rabbitmq) uri=$RABBIT_URI pid=$RABBIT_PID ;;
        warren)
            if [[ $WARREN_OK != 1 ]]; then return 0; fi
            uri=$WARREN_URI pid=$WARREN_PID
            ;;
        base)
            if [[ $BASE_OK != 1 ]]; then return 0; fi
            uri=$BASE_URI pid=$BASE_PID
            ;;
    esac
    out=$RESULTS/$sc-$broker-r$round.json
    # A queue of its own per run: nothing left over by an earlier run can reach this one.
    local args
    read -r -a args <<<"$(scenario_args "$sc")"
    local l0 l1 s0="" s1="" strace_pid=""
    l0=$(load)
    if [[ $sc == persist-* ]]; then
        if [[ $broker == warren || $broker == base ]]; then
            sleep 1.5 # the writer reports its count once idle for a second
            s0=$(warren_syncs "$broker")
        elif [[ $FSYNC_STRACE == 1 ]] && command -v strace >/dev/null; then
            timeout $((DURATION + 5)) strace -f -c -e trace=fsync,fdatasync -p "$pid" \
                -o "$WORK/strace-$sc-$round.txt" 2>/dev/null &
            strace_pid=$!
            sleep 1
        fi
    fi
    log "$sc on $broker (round $round): warren-perf ${args[*]} -z $DURATION  [load $l0]"
    if timeout $((DURATION + 60)) "$PERF" --uri "$uri" "${args[@]}" -z "$DURATION" \
        -u "bench-$sc-r$round" --threads "$PERF_THREADS" --broker-pid "$pid" --label "$broker" \
        --json-out "$out.tmp" | sed 's/^/    /' >&2; then
        :
    else
        log "warren-perf failed on $broker/$sc (exit ${PIPESTATUS[0]})"
    fi
    l1=$(load)
    local fsyncs=null
    if [[ -n $s0 ]]; then
        sleep 1.5
        s1=$(warren_syncs "$broker")
        fsyncs=$(awk -v a="$s0" -v b="$s1" -v d="$DURATION" 'BEGIN {printf "%.0f", (b - a) / d}')
    elif [[ -n $strace_pid ]]; then
        kill -INT "$strace_pid" 2>/dev/null || true
        wait "$strace_pid" 2>/dev/null || true
        fsyncs=$(awk -v d="$DURATION" '$NF == "fsync" || $NF == "fdatasync" {n += $4} END {printf "%.0f", n / d}' \
            "$WORK/strace-$sc-$round.txt" 2>/dev/null || echo null)
        [[ -n $fsyncs ]] || fsyncs=null
    fi
    if [[ -s $out.tmp ]]; then
        jq --arg sc "$sc" --arg b "$broker" --argjson r "$round" --arg l0 "$l0" --arg l1 "$l1" \
            --argjson fsyncs "$fsyncs" \
            '. + {scenario: $sc, broker: $b, round: $r, loadavg_before: $l0, loadavg_after: $l1,
                  fsyncs_per_s: $fsyncs}' \
            "$out.tmp" >"$out"
        rm -f "$out.tmp"
    fi
    if [[ $broker == warren ]] && ! kill -0 "$WARREN_PID" 2>/dev/null; then
        tail -20 "$WORK/warren.log" >&2
        WARREN_OK=0
        WARREN_WHY="exited during $sc"
        log "warren-broker $WARREN_WHY"
    fi
    if [[ $broker == base ]] && ! kill -0 "$BASE_PID" 2>/dev/null; then
        tail -20 "$WORK/base.log" >&2
        BASE_OK=0
        BASE_WHY="exited during $sc"
        log "base $BASE_WHY"
    fi
}

for ((round = 1; round <= ROUNDS; round++)); do
    for sc in $SCENARIOS; do
        for b in $BROKERS; do run_one "$b" "$sc" "$round"; done
        sleep 1
    done
done

# ---------------------------------------------------------------- report
CPU_MODEL=$(cpu_model)
MEM_GIB=$(mem_gib)
shopt -s nullglob
runs=("$RESULTS"/*-r*.json)
jq -s --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg cpu "$CPU_MODEL" --arg nproc "$(nproc)" \
    --arg mem "$MEM_GIB" --arg rabbit "${RABBIT_VERSION:-}" --arg duration "$DURATION" \
    --arg warren_ok "$WARREN_OK" --arg warren_why "$WARREN_WHY" \
    --arg base "$([[ $BASE_OK == 1 ]] && echo "measured: $BASE_BIN" || echo "not measured: $BASE_WHY")" \
    --arg nice "${BENCH_NICE:-0}" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --argjson idle_rabbit "$IDLE_RABBIT" --argjson idle_warren "$IDLE_WARREN" \
    '{date: $date, machine: {cpu: $cpu, nproc: ($nproc | tonumber), mem_gib: ($mem | tonumber)},
      rabbitmq_version: $rabbit, duration_s: ($duration | tonumber), commit: $commit,
      nice: $nice,
      idle_core_percent: {rabbitmq: $idle_rabbit, warren: $idle_warren},
      warren_broker: (if $warren_ok == "1" then "measured" else "not measured: " + $warren_why end),
      base_broker: $base,
      runs: .}' "${runs[@]}" >"$RESULTS/results.json"

# Medians over rounds, one row per scenario and broker.
TABLE=$(jq -r '
  def median: map(select(. != null)) | sort
    | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def f(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  .runs | group_by(.scenario, .broker) | map({
      scenario: .[0].scenario, broker: .[0].broker,
      sent: (map(.sent_rate) | median), recv: (map(.received_rate) | median),
      cp50: (map(.confirm_latency_us.p50) | median), cp99: (map(.confirm_latency_us.p99) | median),
      rp50: (map(.consumer_latency_us.p50) | median), rp99: (map(.consumer_latency_us.p99) | median),
      bcpu: (map(.broker_cpu.us_per_msg) | median), pcpu: (map(.perf_cpu.us_per_msg) | median),
      rss: (map(.broker_rss_kib) | median), load: (map(.loadavg_before) | .[0]),
      fsy: (map(.fsyncs_per_s) | median)})
  | sort_by(.scenario, .broker) | .[]
  | [.scenario, .broker, (.sent | f(0)), (.recv | f(0)),
     "\(.cp50 | f(1)) / \(.cp99 | f(1))", "\(.rp50 | f(1)) / \(.rp99 | f(1))",
     (.bcpu | f(2)), (.pcpu | f(3)), (if .rss == null then "-" else (.rss / 1024 | f(0)) end),
     (if .fsy == null then "-" else (.fsy | f(0)) end), .load]
  | @tsv' "$RESULTS/results.json")

# The same rows as a Markdown table (for docs/benchmarks.md).
{
    echo "| scenario | broker | sent msg/s | received msg/s | confirm p50 / p99 µs | consumer p50 / p99 µs | broker CPU µs/msg | warren-perf CPU µs/msg | broker RSS MiB | fsyncs/s | load avg before |"
    echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    while IFS=$'\t' read -r -a row; do
        [[ ${#row[@]} -gt 0 ]] || continue
        printf '| %s |\n' "$(printf '%s | ' "${row[@]}" | sed 's/ | $//')"
    done <<<"$TABLE"
} >"$RESULTS/table.md"

{
    echo
    echo "warren-perf, ${DURATION}s per run, $(nproc) CPUs ($CPU_MODEL), RabbitMQ ${RABBIT_VERSION:-?}, warren-broker: $( [[ $WARREN_OK == 1 ]] && echo measured || echo "NOT MEASURED ($WARREN_WHY)")"
    echo "idle CPU while the other broker runs (% of a core): RabbitMQ $IDLE_RABBIT, warren-broker $IDLE_WARREN"
    printf '%s\n' "scenario	broker	sent msg/s	recv msg/s	confirm p50/p99 µs	consumer p50/p99 µs	broker CPU µs/msg	perf CPU µs/msg	broker RSS MiB	fsyncs/s	load before" \
        "$TABLE" | column -t -s $'\t'
    echo
    echo "JSON: $RESULTS/results.json"
} | tee "$RESULTS/table.txt"
