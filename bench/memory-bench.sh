#!/usr/bin/env bash
# Memory per queued message, and memory given back: warren-broker vs RabbitMQ (Debian's
# rabbitmq-server package), side by side in one run on this machine, loopback only.
#
#   bench/memory-bench.sh                  # about 4 minutes with three brokers
#   COUNT=50000 bench/memory-bench.sh      # quick check of the script itself
#
# For each broker, started fresh (RabbitMQ as a node of our own: temp dirs, free ports, no
# plugins; warren-broker from the release build), the broker's RSS (VmRSS of its process) is read:
#   start      after start-up, idle
#   backlog    after COUNT transient SIZE-byte messages were published to a queue without
#              consumers (warren-perf -x 1 -y 0 at RATE msg/s with confirms, RATE/COUNT seconds;
#              the queue's depth is read back from the broker): bytes per message =
#              (backlog - start) / depth
#   drained    SETTLE seconds after a consumer took the whole backlog (no-ack)
#   backlog2   after publishing COUNT messages again
#   deleted    SETTLE seconds after the queue was deleted
# and the broker's own figure for the queue's memory where it has one (RabbitMQ: rabbitmqctl
# list_queues memory). Prints a table and writes JSON under $RESULTS; stops everything it started.
#
# Environment (all optional):
#   COUNT=700000 SIZE=16 RATE=50000   messages, body bytes, publish rate
#   SETTLE=10             seconds to wait before reading RSS after a drain or a delete
#   BROKERS="rabbitmq warren"   add "base" for a second warren-broker build (BASE_BIN=path), e.g.
#                         a release build of the commit before a change (see broker-bench.sh),
#                         or LABEL=path for any other build; measured one after the other
#   WARREN_ARGS="..."     extra warren-broker arguments (both builds)
#   RESULTS=dir           where JSON goes (default $CARGO_TARGET_DIR/memory-bench/<UTC time>)
#   CARGO_TARGET_DIR      where the release binaries are built (default target/)
#   SKIP_BUILD=1          use the binaries already built
#   STOP_SYSTEM_RABBITMQ=1  stop a running system rabbitmq-server service first (default 1)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNT=${COUNT:-700000}
SIZE=${SIZE:-16}
RATE=${RATE:-50000}
SETTLE=${SETTLE:-10}
BROKERS=${BROKERS:-rabbitmq warren}
STOP_SYSTEM_RABBITMQ=${STOP_SYSTEM_RABBITMQ:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$TARGET_DIR/memory-bench/$STAMP}
BIN=$TARGET_DIR/release
RABBIT_SBIN=${RABBIT_SBIN:-/usr/lib/rabbitmq/bin}
QUEUE=mem-bench

BENCH_NAME="memory-bench"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

require_tools jq ss timeout python3 curl

begin_run memory-bench

mkdir -p "$RESULTS"
build_release warren-broker
PERF=$BIN/warren-perf
[[ -x $PERF ]] || die "$PERF missing (build it or unset SKIP_BUILD)"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

rabbitmqctl() {
    ERL_EPMD_PORT=$EPMD_PORT timeout 60 "$RABBIT_SBIN/rabbitmqctl" -n "$RABBIT_NODE" "$@"
}

# ---------------------------------------------------------------- brokers
# Each sets URI and PID (and MGMT for warren-broker) or dies.
start_rabbitmq() {
    start_rabbitmq_node membench
    PID=$RABBIT_PID
    URI=$RABBIT_URI
}

start_warren() { # label binary
    local lower=$1 bin=$2 args i addr
    args=(--amqp 127.0.0.1:0 --mgmt 127.0.0.1:0 --data-dir "$WORK/$lower-data")
    grep -q -- "--prometheus" <<<"$("$bin" --help 2>&1 || true)" && args+=(--prometheus 127.0.0.1:0)
    # shellcheck disable=SC2206
    args+=(${WARREN_ARGS:-})
    rm -rf "$WORK/$lower-data"
    log "starting $lower: $bin ${args[*]}"
    : >"$WORK/$lower.log"
    RUST_LOG=${RUST_LOG:-info} "$bin" "${args[@]}" 2>>"$WORK/$lower.log" >/dev/null &
    PID=$!
    PIDS+=("$PID")
    for ((i = 0; i < 100; i++)); do
        addr=$(sed -n 's/.*listening proto=amqp addr=\([^ ]*\).*/\1/p' "$WORK/$lower.log" | head -1 || true)
        MGMT=$(sed -n 's/.*listening proto=mgmt addr=\([^ ]*\).*/\1/p' "$WORK/$lower.log" | head -1 || true)
        if [[ -n $addr && -n $MGMT ]]; then
            URI="amqp://guest:guest@$addr/%2f"
            log "$lower up on $addr (management $MGMT), pid $PID"
            return 0
        fi
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.2
    done
    tail -20 "$WORK/$lower.log" >&2
    die "$lower does not start"
}

# The queue's depth and (RabbitMQ only) its memory in bytes: "depth memory".
queue_figures() { # broker
    if [[ $1 == rabbitmq ]]; then
        rabbitmqctl list_queues -q --no-table-headers name messages memory 2>/dev/null |
            awk -v q="$QUEUE" '$1 == q {print $2, $3; found = 1} END {if (!found) print 0, "null"}'
    else
        curl -sf -u guest:guest "http://$MGMT/api/queues/%2f/$QUEUE" | jq -r '"\(.messages // 0) null"' ||
            echo "0 null"
    fi
}

delete_queue() { # broker
    if [[ $1 == rabbitmq ]]; then
        rabbitmqctl delete_queue "$QUEUE" >/dev/null
    else
        curl -sf -u guest:guest -X DELETE "http://$MGMT/api/queues/%2f/$QUEUE" >/dev/null
    fi
}

publish() { # broker step
    local secs
    secs=$(awk -v c="$COUNT" -v r="$RATE" 'BEGIN {s = c / r; print (s == int(s)) ? s : int(s) + 1}')
    log "$1: publishing $COUNT x $SIZE B at $RATE msg/s ($2)"
    timeout $((secs + 60)) "$PERF" --uri "$URI" -x 1 -y 0 -s "$SIZE" -c 1000 -r "$RATE" -z "$secs" \
        -u "$QUEUE" --auto-delete false --json-out "$WORK/$1-$2.json" >/dev/null 2>&1 ||
        log "warren-perf exited with an error ($1, $2)"
    # Wait until the depth stops moving (the last publishes are in).
    local d prev=-1 i
    for ((i = 0; i < 30; i++)); do
        read -r d _ <<<"$(queue_figures "$1")"
        [[ $d == "$prev" ]] && break
        prev=$d
        sleep 1
    done
}

drain() { # broker
    log "$1: draining the backlog"
    timeout 300 "$PERF" --uri "$URI" -x 0 -y 1 -a -u "$QUEUE" --auto-delete false \
        --exit-when idle -z 240 --json-out "$WORK/$1-drain.json" >/dev/null 2>&1 ||
        log "warren-perf (drain) exited with an error ($1)"
}

measure() { # broker binary
    local b=$1 rss0 rss1 rss2 rss3 rss4 depth qmem depth2 qmem2 _
    case $b in
        rabbitmq) start_rabbitmq ;;
        *) start_warren "$b" "$2" ;;
    esac
    sleep 3
    rss0=$(rss_kib "$PID")
    publish "$b" backlog
    read -r depth qmem <<<"$(queue_figures "$b")"
    rss1=$(rss_kib "$PID")
    log "$b: RSS start $rss0 KiB, with $depth messages $rss1 KiB, queue memory $qmem"
    drain "$b"
    read -r _ _ <<<"$(queue_figures "$b")"
    sleep "$SETTLE"
    rss2=$(rss_kib "$PID")
    log "$b: RSS drained $rss2 KiB"
    publish "$b" backlog2
    read -r depth2 qmem2 <<<"$(queue_figures "$b")"
    rss3=$(rss_kib "$PID")
    delete_queue "$b"
    sleep "$SETTLE"
    rss4=$(rss_kib "$PID")
    log "$b: RSS with $depth2 messages $rss3 KiB, deleted $rss4 KiB"
    jq -n --arg b "$b" --argjson count "$COUNT" --argjson size "$SIZE" \
        --argjson rss0 "$rss0" --argjson rss1 "$rss1" --argjson rss2 "$rss2" \
        --argjson rss3 "$rss3" --argjson rss4 "$rss4" --argjson depth "$depth" \
        --argjson depth2 "$depth2" --argjson qmem "$qmem" --argjson qmem2 "$qmem2" \
        '{broker: $b, count: $count, size: $size, depth: $depth, depth2: $depth2,
          rss_kib: {start: $rss0, backlog: $rss1, drained: $rss2, backlog2: $rss3, deleted: $rss4},
          bytes_per_message: (if $depth > 0 then (($rss1 - $rss0) * 1024 / $depth | round) else null end),
          queue_memory_bytes: $qmem, queue_memory_per_message:
            (if $qmem != null and $depth > 0 then ($qmem / $depth | round) else null end)}' \
        >"$RESULTS/$b.json"
    if [[ $b == rabbitmq ]]; then
        stop_rabbitmq_node
    else
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
}

for b in $BROKERS; do
    case $b in
        rabbitmq) measure rabbitmq ;;
        warren)
            [[ -x $BIN/warren-broker ]] || die "$BIN/warren-broker missing"
            measure warren "$BIN/warren-broker"
            ;;
        base)
            [[ -x ${BASE_BIN:-} ]] || die "BASE_BIN not set or not executable"
            measure base "$BASE_BIN"
            ;;
        *=*) measure "${b%%=*}" "${b#*=}" ;;
        *) die "unknown broker $b" ;;
    esac
done

# ---------------------------------------------------------------- report
shopt -s nullglob
runs=()
for b in $BROKERS; do runs+=("$RESULTS/${b%%=*}.json"); done
jq -s --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg cpu "$(cpu_model)" --arg nproc "$(nproc)" \
    --arg rabbit "${RABBIT_VERSION:-}" --arg base "${BASE_BIN:-}" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    '{date: $date, machine: {cpu: $cpu, nproc: ($nproc | tonumber)}, commit: $commit,
      rabbitmq_version: $rabbit, base_bin: $base, runs: .}' "${runs[@]}" >"$RESULTS/results.json"
{
    echo "| broker | messages | RSS start MiB | RSS with backlog MiB | bytes/message (RSS) | queue memory bytes/message | RSS drained MiB | RSS with 2nd backlog MiB | RSS queue deleted MiB |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    jq -r '.runs[] | def m: . / 1024 | round;
        "| \(.broker) | \(.depth) | \(.rss_kib.start | m) | \(.rss_kib.backlog | m) | \(.bytes_per_message) | \(.queue_memory_per_message // "-") | \(.rss_kib.drained | m) | \(.rss_kib.backlog2 | m) | \(.rss_kib.deleted | m) |"' \
        "$RESULTS/results.json"
} | tee "$RESULTS/table.md"
echo "JSON: $RESULTS/results.json"
