#!/usr/bin/env bash
# 3-node mirrored queue benchmark: a warren-broker cluster vs a RabbitMQ 3.10 cluster (Debian's
# rabbitmq-server package), side by side in one run on this machine, loopback only, both driven
# by warren-perf, both with the policy ha-all = {"ha-mode":"all","ha-sync-mode":"automatic"}.
#
#   bench/cluster-bench.sh                 # full run, about 6 minutes per round
#   DURATION=3 bench/cluster-bench.sh      # quick check of the script itself
#
# Each broker runs as three nodes, a, b and c. Every scenario's queue is durable and declared
# through a (so a holds its master: both brokers put a new queue's master on the declaring
# node) and the run starts once b and c hold in-sync mirrors. The producers connect to b, the
# consumer to c: neither client is on the master's node, so every publish, confirm, delivery and
# ack crosses the cluster (the setup behind a load balancer that sends each connection to any
# node).
#
# Scenarios:
#   cC-xP     1 KiB persistent messages, C confirms in flight per producer (1 or 100), P producers
#             (1 or 4) on b, one consumer on c with manual acks (prefetch 500, one multiple-ack per
#             50). Reported: confirmed msg/s, confirm latency p50/p99, consumer rate, and the CPU
#             the three nodes used per confirmed message.
#   failover  one producer on b, 1 KiB persistent, one confirm in flight (py-amqp/Celery pattern),
#             no consumer; after FAILOVER_KILL_AT seconds the master's process (a) is killed
#             with SIGKILL. Reported: the confirm gap around the kill (warren-perf reports the 8
#             longest times between two confirms while a publish was outstanding, with their
#             wall-clock ends; the one taken is the longest that began within a second of the
#             kill and ended after it), when confirmed publishing resumed counted from the kill,
#             the longest gap of the whole run, the node holding the master afterwards,
#             and the loss check: after the run a consumer on c drains the queue, warren-perf
#             records the ids (body sequence numbers) of every confirmed publish and of every
#             delivery, and "lost" counts confirmed ids never delivered (nacked publishes are not
#             counted as lost; duplicates are deliveries of an id already delivered). The killed
#             node is then started again (from its data) when another round follows.
# Both clusters stay up for the whole run, scenarios alternate between them; idle CPU of each
# cluster is measured at the start since it is charged to the machine during the other's runs.
# Prints tables and writes JSON under $RESULTS. Everything it starts is stopped on exit.
#
# Environment (all optional):
#   DURATION=15             seconds per throughput scenario and broker
#   SCENARIOS="c100-x1 c100-x4 c1-x1 c1-x4 failover"
#   FAILOVER_DURATION=20    seconds of the failover run; FAILOVER_KILL_AT=8 seconds into it
#   FAILOVER_MANDATORY=1    the failover's producer publishes with the mandatory flag: a publish
#                           that finds no queue comes back (basic.return, counted as returned)
#   BROKERS="rabbitmq warren"
#   ROUNDS=1                repeat every scenario, brokers alternating (table = medians)
#   PERF_THREADS=1          warren-perf threads
#   WARREN_FD_MS=           warren's --cluster-failure-detection-ms (default: the broker's, 3000)
#   WARREN_ARGS="..."       extra arguments for every warren-broker node
#   RESULTS=dir             where JSON goes (default $CARGO_TARGET_DIR/cluster-bench/<UTC time>)
#   CARGO_TARGET_DIR        where the release binaries are built (default target/)
#   SKIP_BUILD=1            use the binaries already built
#   STOP_SYSTEM_RABBITMQ=1  stop a running system rabbitmq-server service first (default 1)
#   BENCH_NICE=-10          as in broker-bench.sh
#   KEEP_WORK=1             keep the temp dir (node logs) on exit
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_NAME="cluster-bench"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DURATION=${DURATION:-15}
SCENARIOS=${SCENARIOS:-c100-x1 c100-x4 c1-x1 c1-x4 failover}
# Quick mode (DURATION under 5 s): a shorter failover run too.
((DURATION < 5)) && fo_default=(8 3) || fo_default=(20 8)
FAILOVER_DURATION=${FAILOVER_DURATION:-${fo_default[0]}}
FAILOVER_KILL_AT=${FAILOVER_KILL_AT:-${fo_default[1]}}
BROKERS=${BROKERS:-rabbitmq warren}
ROUNDS=${ROUNDS:-1}
PERF_THREADS=${PERF_THREADS:-1}
STOP_SYSTEM_RABBITMQ=${STOP_SYSTEM_RABBITMQ:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$TARGET_DIR/cluster-bench/$STAMP}
BIN=$TARGET_DIR/release
RABBIT_SBIN=${RABBIT_SBIN:-/usr/lib/rabbitmq/bin}
NODES=(a b c)

require_tools jq ss timeout python3 curl epmd

# ---------------------------------------------------------------- cleanup: stop what we started
WORK=$(mktemp -d /tmp/cluster-bench.XXXXXX)
PIDS=()
declare -A RABBIT_PID=() RABBIT_PORT=() WARREN_PID=() WARREN_PORT=() WARREN_MGMT=() WARREN_CPORT=()
EPMD_PORT=""
cleanup() {
    local n pid stoppers=()
    for n in "${NODES[@]}"; do
        if [[ -n ${RABBIT_PID[$n]:-} ]] && kill -0 "${RABBIT_PID[$n]}" 2>/dev/null; then
            log "stopping RabbitMQ node $(rabbit_node "$n")"
            rabbitmqctl "$n" stop >/dev/null 2>&1 &
            stoppers+=($!)
        fi
    done
    for pid in "${stoppers[@]}"; do wait "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}" "${RABBIT_PID[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n ${KEEP_WORK:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$RESULTS"
HZ=$(getconf CLK_TCK)

# ---------------------------------------------------------------- build
build_release warren-broker warren-ctl
PERF=$BIN/warren-perf
[[ -x $PERF ]] || die "$PERF missing (build it or unset SKIP_BUILD)"
"$PERF" --help | grep -q -- --ids-out || die "$PERF is older than this script (no --ids-out): build it"
grep -q confirm_gaps "$PERF" || die "$PERF is older than this script (no confirm_gaps): build it"
if [[ $WARREN_OK == 1 ]] && ! [[ -x $BIN/warren-broker && -x $BIN/warren-ctl ]]; then
    WARREN_OK=0
    WARREN_WHY="binary missing"
fi
apply_bench_nice

# ---------------------------------------------------------------- RabbitMQ
# Three nodes rabbit-bench-{a,b,c}@localhost: their own epmd on a free port, a temp HOME whose
# .erlang.cookie they and rabbitmqctl share, free AMQP and distribution ports, no plugins.
rabbit_node() { echo "rabbit-bench-$1@localhost"; }
RABBIT_HOME=$WORK/rabbit-home
rabbit_env() {
    env HOME="$RABBIT_HOME" ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT="$EPMD_PORT" \
        RABBITMQ_CTL_DIST_PORT_MIN=0 RABBITMQ_CTL_DIST_PORT_MAX=0 \
        RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" "$@"
}
# rabbitmqctl NODE(a|b|c) ARGS...
rabbitmqctl() {
    local n=$1
    shift
    rabbit_env timeout 60 "$RABBIT_SBIN/rabbitmqctl" -n "$(rabbit_node "$n")" "$@"
}

start_rabbit_node() { # a|b|c; the same ports and data when it is started again
    local n=$1 dir=$WORK/rabbitmq-$1 dist
    if [[ -z ${RABBIT_PORT[$n]:-} ]]; then
        RABBIT_PORT[$n]=$(free_port)
        mkdir -p "$dir/mnesia" "$dir/log"
        echo '[].' >"$dir/enabled_plugins"
        free_port >"$dir/dist-port"
    fi
    dist=$(cat "$dir/dist-port")
    rm -f "$dir/pid"
    rabbit_env RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="${RABBIT_PORT[$n]}" \
        RABBITMQ_NODENAME="$(rabbit_node "$n")" RABBITMQ_DIST_PORT="$dist" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/pid" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$RABBIT_SBIN/rabbitmq-server" >>"$WORK/rabbitmq-$n.out" 2>&1 &
    PIDS+=($!)
}

wait_rabbit_node() {
    local n=$1 i
    for ((i = 0; i < 240; i++)); do
        if ss -ltn "sport = :${RABBIT_PORT[$n]}" | grep -q LISTEN && [[ -s $WORK/rabbitmq-$n/pid ]]; then
            RABBIT_PID[$n]=$(cat "$WORK/rabbitmq-$n/pid")
            return 0
        fi
        sleep 0.5
    done
    tail -30 "$WORK/rabbitmq-$n.out" >&2
    return 1
}

RABBIT_OK=0
RABBIT_WHY="not selected"
start_rabbitmq() {
    if [[ $STOP_SYSTEM_RABBITMQ == 1 ]] && pgrep -f 'beam.*rabbit@' >/dev/null 2>&1; then
        log "stopping the system rabbitmq-server service"
        service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
    mkdir -p "$RABBIT_HOME"
    python3 -c 'import secrets; print(secrets.token_hex(20).upper(), end="")' >"$RABBIT_HOME/.erlang.cookie"
    chmod 400 "$RABBIT_HOME/.erlang.cookie"
    EPMD_PORT=$(free_port)
    epmd -port "$EPMD_PORT" -address 127.0.0.1 >"$WORK/epmd.out" 2>&1 &
    PIDS+=($!)
    wait_listen "$EPMD_PORT" 50 || die "epmd did not start"
    local n
    log "starting RabbitMQ nodes $(rabbit_node a), b, c (no plugins, epmd on 127.0.0.1:$EPMD_PORT)"
    for n in "${NODES[@]}"; do start_rabbit_node "$n"; done
    for n in "${NODES[@]}"; do
        if ! wait_rabbit_node "$n"; then
            RABBIT_WHY="node $n did not start"
            log "RabbitMQ $RABBIT_WHY: not measured"
            return 0
        fi
    done
    for n in b c; do
        if ! { rabbitmqctl "$n" stop_app && rabbitmqctl "$n" join_cluster "$(rabbit_node a)" &&
            rabbitmqctl "$n" start_app; } >>"$WORK/rabbitmqctl.out" 2>&1; then
            tail -20 "$WORK/rabbitmqctl.out" >&2
            RABBIT_WHY="node $n did not join"
            log "RabbitMQ $RABBIT_WHY: not measured"
            return 0
        fi
    done
    rabbitmqctl a set_policy --apply-to queues ha-all "" '{"ha-mode":"all","ha-sync-mode":"automatic"}' \
        >>"$WORK/rabbitmqctl.out" 2>&1 || die "rabbitmqctl set_policy failed"
    local running
    running=$(rabbitmqctl a cluster_status --formatter json | jq -r '.running_nodes | length') || running=0
    RABBIT_VERSION=$(sed -n 's/.*RabbitMQ \([0-9][0-9.]*\).*/\1/p' "$WORK/rabbitmq-a.out" | head -1)
    log "RabbitMQ ${RABBIT_VERSION:-?}: $running nodes running, ports a=${RABBIT_PORT[a]} b=${RABBIT_PORT[b]} c=${RABBIT_PORT[c]}"
    [[ $running == 3 ]] || { RABBIT_WHY="cluster has $running running nodes"; return 0; }
    RABBIT_OK=1
}

# JSON {in_sync, messages} of the queue NAME as node N sees it ("" when unknown).
rabbit_queue() {
    rabbitmqctl "$1" list_queues name synchronised_slave_pids messages --formatter json 2>/dev/null |
        jq -c --arg q "$2" '.[] | select(.name == $q)
            | {in_sync: (.synchronised_slave_pids | if type == "array" then length else 0 end), messages}' ||
        true
}
# The node that holds queue NAME's master: the one whose --local listing has it (rabbitmqctl shows
# the master's pid, not its node).
rabbit_master() {
    local n
    for n in "${NODES[@]}"; do
        [[ -n ${RABBIT_PID[$n]:-} ]] || continue
        if rabbitmqctl "$n" list_queues --local name --formatter json 2>/dev/null |
            jq -e --arg q "$1" 'any(.[]; .name == $q)' >/dev/null 2>&1; then
            rabbit_node "$n"
            return 0
        fi
    done
}

# ---------------------------------------------------------------- warren-broker
# Three nodes bench-{a,b,c}@localhost with free AMQP, management and cluster ports, their own data
# dirs and a shared secret; b and c join a; the policy goes through warren-ctl.
warren_node() { echo "bench-$1@localhost"; }
warren_ctl() { # NODE ARGS...
    local n=$1
    shift
    timeout 30 "$BIN/warren-ctl" -n "http://127.0.0.1:${WARREN_MGMT[$n]}" "$@"
}
warren_api() { # NODE PATH
    curl -fsS --max-time 10 -u guest:guest "http://127.0.0.1:${WARREN_MGMT[$1]}$2"
}

start_warren_node() { # a|b|c [join]; the same ports and data when it is started again
    local n=$1 join=${2:-}
    if [[ -z ${WARREN_PORT[$n]:-} ]]; then
        WARREN_PORT[$n]=$(free_port)
        WARREN_MGMT[$n]=$(free_port)
        WARREN_CPORT[$n]=$(free_port)
    fi
    local args=(--node-name "$(warren_node "$n")" --data-dir "$WORK/warren-$n"
        --amqp "127.0.0.1:${WARREN_PORT[$n]}" --mgmt "127.0.0.1:${WARREN_MGMT[$n]}"
        --cluster-listen "127.0.0.1:${WARREN_CPORT[$n]}" --cluster-secret-file "$WORK/warren-secret")
    [[ -n ${WARREN_FD_MS:-} ]] && args+=(--cluster-failure-detection-ms "$WARREN_FD_MS")
    [[ -n $join ]] && args+=(--join "127.0.0.1:${WARREN_CPORT[a]}")
    # shellcheck disable=SC2206
    args+=(${WARREN_ARGS:-})
    echo "$BIN/warren-broker ${args[*]}" >>"$WORK/warren-$n.log"
    RUST_LOG=${RUST_LOG:-info} "$BIN/warren-broker" "${args[@]}" 2>>"$WORK/warren-$n.log" >/dev/null &
    WARREN_PID[$n]=$!
    PIDS+=($!)
}

wait_warren_node() {
    local n=$1 i
    for ((i = 0; i < 300; i++)); do
        warren_api "$n" /api/overview >/dev/null 2>&1 && wait_listen "${WARREN_PORT[$n]}" 1 && return 0
        kill -0 "${WARREN_PID[$n]}" 2>/dev/null || break
        sleep 0.2
    done
    tail -20 "$WORK/warren-$n.log" >&2
    return 1
}

# Members that node N sees as running voters.
warren_running() {
    warren_api "$1" /api/nodes 2>/dev/null | jq '[.[] | select(.running == true and .voter == true)] | length' ||
        echo 0
}

start_warren() {
    python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$WORK/warren-secret"
    chmod 600 "$WORK/warren-secret"
    local n i
    start_warren_node a
    if ! wait_warren_node a; then
        WARREN_OK=0 WARREN_WHY="node a does not start"
        return 0
    fi
    for n in b c; do start_warren_node "$n" join; done
    for n in b c; do
        if ! wait_warren_node "$n"; then
            WARREN_OK=0 WARREN_WHY="node $n does not start"
            return 0
        fi
    done
    for ((i = 0; i < 150; i++)); do
        [[ $(warren_running a) == 3 ]] && break
        sleep 0.2
    done
    if [[ $(warren_running a) != 3 ]]; then
        WARREN_OK=0 WARREN_WHY="a does not see 3 running voters"
        warren_api a /api/nodes >&2 || true
        return 0
    fi
    if ! warren_ctl a set_policy ha-all "" '{"ha-mode":"all","ha-sync-mode":"automatic"}' >>"$WORK/warren-ctl.out" 2>&1; then
        cat "$WORK/warren-ctl.out" >&2
        WARREN_OK=0 WARREN_WHY="set_policy failed"
        return 0
    fi
    log "warren: 3 voters running, ports a=${WARREN_PORT[a]} b=${WARREN_PORT[b]} c=${WARREN_PORT[c]}"
}

warren_queue() { # NODE NAME
    warren_api "$1" "/api/queues/%2F/$2" 2>/dev/null |
        jq -c '{master: .node, in_sync: (.synchronised_slave_nodes // [] | length), messages}' || true
}

# ---------------------------------------------------------------- per broker
node_uri() { # broker node
    local port
    case $1 in
        rabbitmq) port=${RABBIT_PORT[$2]} ;;
        warren) port=${WARREN_PORT[$2]} ;;
    esac
    echo "amqp://guest:guest@127.0.0.1:$port/%2f"
}
node_pid() { # broker node
    case $1 in
        rabbitmq) echo "${RABBIT_PID[$2]:-}" ;;
        warren) echo "${WARREN_PID[$2]:-}" ;;
    esac
}
broker_ok() {
    case $1 in
        rabbitmq) [[ $RABBIT_OK == 1 ]] ;;
        warren) [[ $WARREN_OK == 1 ]] ;;
    esac
}
queue_info() { # broker node queue
    case $1 in
        rabbitmq) rabbit_queue "$2" "$3" ;;
        warren) warren_queue "$2" "$3" ;;
    esac
}
# queue_info with the master's node (slower for RabbitMQ).
queue_info_master() { # broker node queue
    local info
    info=$(queue_info "$@")
    [[ -n $info && $1 == rabbitmq ]] && info=$(jq -c --arg m "$(rabbit_master "$3")" '. + {master: $m}' <<<"$info")
    echo "$info"
}
delete_queue() { # broker node queue
    case $1 in
        rabbitmq) rabbitmqctl "$2" delete_queue "$3" >/dev/null 2>&1 ;;
        warren) warren_ctl "$2" delete_queue "$3" >/dev/null 2>&1 ;;
    esac
}
cluster_ticks() { # broker: CPU ticks of its three node processes
    local n sum=0
    for n in "${NODES[@]}"; do
        sum=$((sum + $(cpu_ticks "$(node_pid "$1" "$n")")))
    done
    echo "$sum"
}

# declare_on_a BROKER QUEUE: declares the durable queue through node a (a consumer that goes
# after a second) and waits until b and c hold in-sync mirrors. Prints the queue's info.
declare_on_a() {
    local broker=$1 q=$2 i info=""
    timeout 30 "$PERF" --uri "$(node_uri "$broker" a)" -x 0 -y 1 -f persistent --auto-delete false \
        -u "$q" -z 1 >"$WORK/declare.out" 2>&1 || { cat "$WORK/declare.out" >&2; return 1; }
    for ((i = 0; i < 100; i++)); do
        info=$(queue_info "$broker" a "$q")
        [[ -n $info ]] && [[ $(jq '.in_sync' <<<"$info") == 2 ]] && break
        sleep 0.3
    done
    queue_info_master "$broker" a "$q"
}

# ---------------------------------------------------------------- start
[[ " $BROKERS " == *" rabbitmq "* ]] && start_rabbitmq
if [[ " $BROKERS " == *" warren "* ]]; then
    [[ $WARREN_OK == 1 ]] && start_warren
else
    WARREN_OK=0
    WARREN_WHY="not selected"
fi
[[ $WARREN_OK == 1 ]] || log "warren not measured: $WARREN_WHY"
[[ $RABBIT_OK == 1 ]] || log "RabbitMQ not measured: $RABBIT_WHY"

# Idle CPU of each cluster (all three nodes, % of one core over 3 s, both at once).
idle_rabbit=null
idle_warren=null
sleep 2
r0=$(broker_ok rabbitmq && cluster_ticks rabbitmq || echo 0)
w0=$(broker_ok warren && cluster_ticks warren || echo 0)
sleep 3
broker_ok rabbitmq && idle_rabbit=$(awk -v a="$r0" -v b="$(cluster_ticks rabbitmq)" -v hz="$HZ" 'BEGIN {printf "%.1f", (b - a) * 100 / hz / 3}')
broker_ok warren && idle_warren=$(awk -v a="$w0" -v b="$(cluster_ticks warren)" -v hz="$HZ" 'BEGIN {printf "%.1f", (b - a) * 100 / hz / 3}')
log "idle CPU of each 3-node cluster (% of a core): RabbitMQ $idle_rabbit, warren $idle_warren"

# ---------------------------------------------------------------- throughput scenarios
run_throughput() { # broker scenario round
    local broker=$1 sc=$2 round=$3
    local c=${sc#c} x
    x=${c#*-x}
    c=${c%-x*}
    local q="bench-$sc-r$round" out=$RESULTS/$sc-$broker-r$round.json info
    if ! info=$(declare_on_a "$broker" "$q"); then
        log "$sc on $broker: could not declare $q"
        return 0
    fi
    [[ $(jq '.in_sync' <<<"$info" 2>/dev/null) == 2 ]] ||
        log "warning: $q on $broker: mirrors not in sync after 30 s: $info"
    local args=(--uri "$(node_uri "$broker" b)" --consumer-uri "$(node_uri "$broker" c)"
        -x "$x" -y 1 -s 1024 -f persistent -c "$c" -q 500 --multi-ack-every 50
        --auto-delete false -u "$q" -z "$DURATION" --threads "$PERF_THREADS"
        --broker-pid "$(node_pid "$broker" a)" --label "$broker")
    local l0 t0 t1
    l0=$(load)
    log "$sc on $broker (round $round): producers on b, consumer on c, master $(jq -r .master <<<"$info") [load $l0]"
    t0=$(cluster_ticks "$broker")
    if timeout $((DURATION + 60)) "$PERF" "${args[@]}" --json-out "$out.tmp" | sed 's/^/    /' >&2; then
        :
    else
        log "warren-perf failed on $broker/$sc (exit ${PIPESTATUS[0]})"
    fi
    t1=$(cluster_ticks "$broker")
    if [[ -s $out.tmp ]]; then
        jq --arg sc "$sc" --arg b "$broker" --argjson r "$round" --arg l0 "$l0" --arg l1 "$(load)" \
            --argjson ticks "$((t1 - t0))" --argjson hz "$HZ" --argjson queue "$info" \
            '. + {scenario: $sc, broker: $b, round: $r, loadavg_before: $l0, loadavg_after: $l1,
                  queue_at_start: $queue,
                  cluster_cpu: {cpu_s: ($ticks / $hz),
                                us_per_confirmed: (if .confirmed > 0 then $ticks / $hz * 1e6 / .confirmed else null end),
                                core_percent: ($ticks / $hz / .elapsed_s * 100)}}' \
            "$out.tmp" >"$out"
        rm -f "$out.tmp"
    fi
    delete_queue "$broker" a "$q" || log "warning: could not delete $q on $broker"
}

# ---------------------------------------------------------------- failover
restart_node() { # broker node
    case $1 in
        rabbitmq)
            start_rabbit_node "$2"
            wait_rabbit_node "$2" && rabbitmqctl "$2" await_startup >/dev/null 2>&1
            ;;
        warren)
            start_warren_node "$2"
            wait_warren_node "$2" || return 1
            local i
            for ((i = 0; i < 150; i++)); do
                [[ $(warren_running "$2") == 3 ]] && return 0
                sleep 0.2
            done
            return 1
            ;;
    esac
}

run_failover() { # broker round
    local broker=$1 round=$2 sc=failover
    local q="bench-failover-r$round" out=$RESULTS/failover-$broker-r$round.json info
    local ids_pub=$WORK/ids-pub-$broker-$round.json ids_drain=$WORK/ids-drain-$broker-$round.json
    if ! info=$(declare_on_a "$broker" "$q"); then
        log "failover on $broker: could not declare $q"
        return 0
    fi
    log "failover on $broker (round $round): producer on b at c1, kill -9 of a (master $(jq -r .master <<<"$info"), $(jq .in_sync <<<"$info") in-sync mirrors) after ${FAILOVER_KILL_AT}s [load $(load)]"
    local flags=(-f persistent)
    [[ -n ${FAILOVER_MANDATORY:-} ]] && flags+=(-f mandatory)
    timeout $((FAILOVER_DURATION + 60)) "$PERF" --uri "$(node_uri "$broker" b)" -x 1 -y 0 -s 1024 \
        "${flags[@]}" -c 1 --auto-delete false -u "$q" -z "$FAILOVER_DURATION" --label "$broker" \
        --ids-out "$ids_pub" --json-out "$out.pub" >"$WORK/failover-pub.out" 2>&1 &
    local perf_pid=$!
    sleep "$FAILOVER_KILL_AT"
    local victim kill_ms
    victim=$(node_pid "$broker" a)
    kill_ms=$(date +%s%3N)
    kill -KILL "$victim"
    log "killed a (pid $victim)"
    local perf_rc=0
    wait "$perf_pid" || perf_rc=$?
    sed 's/^/    /' "$WORK/failover-pub.out" | grep -v '^    time ' >&2 || true
    case $broker in
        rabbitmq) RABBIT_PID[a]="" ;;
        warren) WARREN_PID[a]="" ;;
    esac
    # Where the master is now, and what the queue holds, as b sees it.
    local after i
    for ((i = 0; i < 50; i++)); do
        after=$(queue_info_master "$broker" b "$q")
        [[ -n $after ]] && break
        sleep 0.3
    done
    local after_c
    after_c=$(queue_info "$broker" c "$q")
    log "after the kill: as b sees it $after, as c sees it ${after_c:-?}"
    # Drain through c, recording every delivered id.
    timeout 300 "$PERF" --uri "$(node_uri "$broker" c)" -x 0 -y 1 -f persistent -q 500 \
        --multi-ack-every 50 --auto-delete false -u "$q" -z 240 --exit-when idle \
        --ids-out "$ids_drain" --json-out "$out.drain" >"$WORK/failover-drain.out" 2>&1 ||
        { log "drain failed on $broker:"; tail -5 "$WORK/failover-drain.out" >&2; }
    local check='null'
    if [[ -s $ids_pub && -s $ids_drain ]]; then
        check=$(python3 - "$ids_pub" "$ids_drain" <<'PY'
import json, sys
pub = json.load(open(sys.argv[1]))["confirmed"] or {"ranges": [], "count": 0}
got = json.load(open(sys.argv[2]))["consumed"] or {"ranges": [], "count": 0, "duplicates": 0}
def ids(rs):
    s = set()
    for a, b in rs:
        s.update(range(a, b + 1))
    return s
confirmed, consumed = ids(pub["ranges"]), ids(got["ranges"])
lost = sorted(confirmed - consumed)
print(json.dumps({"confirmed": len(confirmed), "consumed": len(consumed),
                  "duplicates": got["duplicates"], "lost": len(lost), "lost_first": lost[:20],
                  "consumed_unconfirmed": len(consumed - confirmed)}))
PY
) || check=null
    fi
    if [[ -s $out.pub ]]; then
        jq --arg b "$broker" --argjson r "$round" --argjson kill_ms "$kill_ms" --argjson check "$check" \
            --argjson before "$info" --argjson after "${after:-null}" --argjson rc "$perf_rc" \
            --argjson after_c "${after_c:-null}" \
            --slurpfile drain <(cat "$out.drain" 2>/dev/null || echo null) \
            '. + {scenario: "failover", broker: $b, round: $r, kill_unix_ms: $kill_ms,
                  queue_before: $before, queue_after: $after, queue_after_on_c: $after_c, perf_exit: $rc, loss_check: $check,
                  drain: ($drain[0] | if . == null then null else {received, elapsed_s, errors} end),
                  failover_gap: ([(.confirm_gaps // [])[]
                    | select(.from_unix_ms >= $kill_ms - 1000 and .from_unix_ms <= $kill_ms + 1000
                             and .to_unix_ms > $kill_ms)] | first)}
            | . + {gap_began_after_kill_ms: (if .failover_gap == null then null
                                             else .failover_gap.from_unix_ms - $kill_ms end),
                   resumed_after_kill_ms: (if .failover_gap == null or (.failover_gap.ended_by_ack | not)
                                           then null else .failover_gap.to_unix_ms - $kill_ms end),
                   failover_gap_shorter_than_ms: (if .failover_gap == null and (.confirm_gaps | length) == 8
                                                  then .confirm_gaps[-1].ms else null end)}' \
            "$out.pub" >"$out"
        jq -r 'def r: if . == null then "-" else round end;
            "    confirm gap around the kill \(.failover_gap.ms | r) ms (began \(.gap_began_after_kill_ms | r) ms after the kill), confirms resumed \(.resumed_after_kill_ms | r) ms after the kill; longest gap of the run \(.longest_confirm_gap.ms | r) ms; confirmed \(.confirmed), nacked \(.nacked), returned \(.returned), loss check \(.loss_check)"' "$out" >&2
    fi
    rm -f "$out.pub" "$out.drain"
    delete_queue "$broker" b "$q" || log "warning: could not delete $q on $broker"
    # Back to three nodes for the next round.
    if ((round < ROUNDS)); then
        log "starting a of $broker again"
        if ! restart_node "$broker" a; then
            log "$broker: a does not come back: no more rounds for it"
            case $broker in
                rabbitmq) RABBIT_OK=0 RABBIT_WHY="a did not restart after the failover" ;;
                warren) WARREN_OK=0 WARREN_WHY="a did not restart after the failover" ;;
            esac
        fi
        sleep 3
    fi
}

for ((round = 1; round <= ROUNDS; round++)); do
    for sc in $SCENARIOS; do
        for b in $BROKERS; do
            broker_ok "$b" || continue
            case $sc in
                failover) run_failover "$b" "$round" ;;
                c*-x*) run_throughput "$b" "$sc" "$round" ;;
                *) die "unknown scenario $sc" ;;
            esac
            for n in "${NODES[@]}"; do
                pid=$(node_pid "$b" "$n")
                if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
                    log "$b node $n exited during $sc"
                    case $b in
                        rabbitmq) RABBIT_OK=0 RABBIT_WHY="node $n exited during $sc" ;;
                        warren) WARREN_OK=0 WARREN_WHY="node $n exited during $sc" ;;
                    esac
                fi
            done
        done
        sleep 1
    done
done

# ---------------------------------------------------------------- report
shopt -s nullglob
runs=("$RESULTS"/*-r*.json)
((${#runs[@]} > 0)) || die "no run produced results"
jq -s --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg cpu "$(cpu_model)" --arg nproc "$(nproc)" \
    --arg mem "$(mem_gib)" --arg rabbit "${RABBIT_VERSION:-}" --arg duration "$DURATION" \
    --arg warren "$([[ $WARREN_OK == 1 ]] && echo measured || echo "not measured (at the end): $WARREN_WHY")" \
    --arg rabbitmq "$([[ $RABBIT_OK == 1 ]] && echo measured || echo "not measured (at the end): $RABBIT_WHY")" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg dirty "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | wc -l)" \
    --arg fd "${WARREN_FD_MS:-default}" --arg nice "${BENCH_NICE:-0}" \
    --argjson idle_rabbit "$idle_rabbit" --argjson idle_warren "$idle_warren" \
    --argjson fo_dur "$FAILOVER_DURATION" --argjson fo_kill "$FAILOVER_KILL_AT" \
    '{date: $date, machine: {cpu: $cpu, nproc: ($nproc | tonumber), mem_gib: ($mem | tonumber)},
      rabbitmq_version: $rabbit, duration_s: ($duration | tonumber), commit: $commit,
      tracked_files_modified: ($dirty | tonumber), nice: $nice,
      warren_failure_detection_ms: $fd,
      failover: {duration_s: $fo_dur, kill_at_s: $fo_kill},
      idle_cluster_core_percent: {rabbitmq: $idle_rabbit, warren: $idle_warren},
      warren: $warren, rabbitmq: $rabbitmq, runs: .}' "${runs[@]}" >"$RESULTS/results.json"

MEDIAN='def median: map(select(. != null)) | sort
    | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def f(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  def ms: if . == null then null else . / 1000 end;'

TABLE=$(jq -r "$MEDIAN"'
  [.runs[] | select(.scenario != "failover")] | group_by(.scenario, .broker) | map({
      scenario: .[0].scenario, broker: .[0].broker, n: length,
      conf: (map(.confirmed_rate) | median), recv: (map(.received_rate) | median),
      cp50: (map(.confirm_latency_us.p50) | median), cp99: (map(.confirm_latency_us.p99) | median),
      rp99: (map(.consumer_latency_us.p99) | median),
      ccpu: (map(.cluster_cpu.us_per_confirmed) | median), nack: (map(.nacked) | add),
      err: (map(.errors | length) | add)})
  | sort_by(.scenario, .broker) | .[]
  | [.scenario, .broker, (.conf | f(0)), "\(.cp50 | ms | f(2)) / \(.cp99 | ms | f(2))",
     (.recv | f(0)), (.rp99 | ms | f(1)), (.ccpu | f(1)), (.nack | tostring), (.err | tostring),
     (.n | tostring)]
  | @tsv' "$RESULTS/results.json")

FAILOVER_TABLE=$(jq -r '
  def f(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  [.runs[] | select(.scenario == "failover")] | sort_by(.broker, .round) | .[]
  | [.broker, (.round | tostring),
     (if .failover_gap != null then (.failover_gap.ms | f(0))
      elif .failover_gap_shorter_than_ms != null then "< \(.failover_gap_shorter_than_ms | f(0))"
      else "-" end),
     (.gap_began_after_kill_ms | f(0)), (.resumed_after_kill_ms | f(0)), (.longest_confirm_gap.ms | f(0)),
     (.confirmed | tostring), (.nacked | tostring), (.returned | tostring),
     (.loss_check.lost // "-" | tostring), (.loss_check.duplicates // "-" | tostring),
     (.loss_check.consumed_unconfirmed // "-" | tostring),
     (.queue_after.master // "-"), ((.errors | length) | tostring)]
  | @tsv' "$RESULTS/results.json")

{
    echo "| scenario | broker | confirmed msg/s | confirm p50 / p99 ms | consumed msg/s | consumer p99 ms | cluster CPU µs per confirmed msg | nacked | errors | rounds |"
    echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    while IFS=$'\t' read -r -a row; do
        [[ ${#row[@]} -gt 0 ]] || continue
        printf '| %s |\n' "$(printf '%s | ' "${row[@]}" | sed 's/ | $//')"
    done <<<"$TABLE"
    echo
    echo "| failover | round | confirm gap around the kill ms | it began ms after the kill | confirms resumed ms after the kill | longest confirm gap of the run ms | confirmed | nacked | returned | confirmed but lost | duplicates | delivered, not confirmed | master after | errors |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"
    while IFS=$'\t' read -r -a row; do
        [[ ${#row[@]} -gt 0 ]] || continue
        printf '| %s |\n' "$(printf '%s | ' "${row[@]}" | sed 's/ | $//')"
    done <<<"$FAILOVER_TABLE"
} >"$RESULTS/table.md"

{
    echo
    echo "warren-perf, ${DURATION}s per run, $(nproc) CPUs ($(cpu_model)), RabbitMQ ${RABBIT_VERSION:-?}; 3 nodes each, ha-all, producers on b, consumer on c, master on a"
    echo "warren: $([[ $WARREN_OK == 1 ]] && echo measured || echo "NOT MEASURED at the end ($WARREN_WHY)"); RabbitMQ: $([[ $RABBIT_OK == 1 ]] && echo measured || echo "NOT MEASURED at the end ($RABBIT_WHY)")"
    echo "idle CPU of each cluster while the other runs (% of a core): RabbitMQ $idle_rabbit, warren $idle_warren"
    if [[ -n $TABLE ]]; then
        printf '%s\n' "scenario	broker	confirmed msg/s	confirm p50/p99 ms	consumed msg/s	consumer p99 ms	cluster CPU µs/confirmed	nacked	errors	rounds" \
            "$TABLE" | column -t -s $'\t'
    fi
    if [[ -n $FAILOVER_TABLE ]]; then
        echo
        printf '%s\n' "failover	round	gap at kill ms	began after kill ms	resumed after kill ms	longest gap ms	confirmed	nacked	returned	lost	duplicates	delivered unconfirmed	master after	errors" \
            "$FAILOVER_TABLE" | column -t -s $'\t'
    fi
    echo
    echo "JSON: $RESULTS/results.json"
} | tee "$RESULTS/table.txt"
