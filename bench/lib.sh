# shellcheck shell=bash
# Shell helpers shared by bench/broker-bench.sh, cluster-bench.sh, memory-bench.sh and storm-bench.sh
# (sourced, not run).
# The sourcing script sets BENCH_NAME (the prefix of its log lines) first.

log() { printf '[%s %s] %s\n' "${BENCH_NAME:-bench}" "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# require_tools TOOL...: dies naming the first one missing.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is not installed"
    done
}

# A TCP port free on the loopback right now (the kernel's pick for port 0).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_listen PORT TRIES: true once something listens on PORT (polled every 0.1 s).
wait_listen() {
    local i
    for ((i = 0; i < $2; i++)); do
        ss -ltn "sport = :$1" | grep -q LISTEN && return 0
        sleep 0.1
    done
    return 1
}

load() { cut -d' ' -f1-3 /proc/loadavg; }

# CPU time (user + system) of a process in clock ticks, 0 when it is gone.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# With BENCH_NICE set, runs this shell (and so the brokers and warren-perf it starts) at that nice
# value; see broker-bench.sh's header for why setsid matters with scheduler autogroups.
apply_bench_nice() {
    [[ -n ${BENCH_NICE:-} ]] || return 0
    renice -n "$BENCH_NICE" -p $$ >/dev/null || die "cannot renice to $BENCH_NICE"
    # With scheduler autogroups (one per session) nice only ranks processes inside a session; a
    # session of its own (setsid) can carry the nice value against the others.
    if [[ $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null) == 1 ]]; then
        if [[ $(ps -o sid= -p $$ | tr -d ' ') == "$$" ]]; then
            echo "$BENCH_NICE" >"/proc/$$/autogroup" || log "cannot set the autogroup nice value"
        else
            log "note: scheduler autogroups are on: start with setsid for BENCH_NICE to count against other sessions"
        fi
    fi
}

# The machine, for the reports.
cpu_model() { sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1; }
mem_gib() { awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo; }

# start_rabbitmq_node PREFIX: a RabbitMQ node of the script's own (Debian's rabbitmq-server, no
# plugins, temp dirs under $WORK, free loopback ports, an epmd of its own started once), named
# PREFIX-<pid>@localhost. Sets RABBIT_NODE, RABBIT_PID (beam), RABBIT_ADDR, RABBIT_URI,
# RABBIT_VERSION and EPMD_PORT; adds what it starts to PIDS. Needs WORK, PIDS, RABBIT_SBIN and
# STOP_SYSTEM_RABBITMQ (1: stop a running system rabbitmq-server service first).
start_rabbitmq_node() {
    if [[ $STOP_SYSTEM_RABBITMQ == 1 ]] && pgrep -f 'beam.*rabbit@' >/dev/null 2>&1; then
        log "stopping the system rabbitmq-server service"
        service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
    local port dist dir i
    port=$(free_port)
    dist=$(free_port)
    dir=$WORK/rabbitmq
    rm -rf "$dir"
    mkdir -p "$dir/mnesia" "$dir/log"
    echo '[].' >"$dir/enabled_plugins"
    if [[ -z ${EPMD_PORT:-} ]]; then
        EPMD_PORT=$(free_port)
        epmd -port "$EPMD_PORT" -address 127.0.0.1 >"$WORK/epmd.out" 2>&1 &
        PIDS+=($!)
        wait_listen "$EPMD_PORT" 50 || true
    fi
    RABBIT_NODE="$1-$$@localhost"
    log "starting RabbitMQ node $RABBIT_NODE on 127.0.0.1:$port (no plugins)"
    RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$port \
        RABBITMQ_NODENAME=$RABBIT_NODE RABBITMQ_DIST_PORT=$dist \
        RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins RABBITMQ_PID_FILE=$dir/pid \
        RABBITMQ_CONFIG_FILE=$dir/rabbitmq RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD_PORT \
        "$RABBIT_SBIN/rabbitmq-server" >"$WORK/rabbitmq.out" 2>&1 &
    PIDS+=($!)
    for ((i = 0; i < 120; i++)); do
        if ss -ltn "sport = :$port" | grep -q LISTEN && [[ -s $dir/pid ]]; then
            RABBIT_PID=$(cat "$dir/pid")
            RABBIT_ADDR="127.0.0.1:$port"
            RABBIT_URI="amqp://guest:guest@$RABBIT_ADDR/%2f"
            RABBIT_VERSION=$(sed -n 's/.*RabbitMQ \([0-9][0-9.]*\).*/\1/p' "$WORK/rabbitmq.out" | head -1)
            log "RabbitMQ ${RABBIT_VERSION:-?} up, beam pid $RABBIT_PID"
            return 0
        fi
        sleep 0.5
    done
    tail -30 "$WORK/rabbitmq.out" >&2
    die "RabbitMQ did not start"
}

# The start of a run named NAME: a work dir of its own ($WORK), no process started yet (PIDS), no
# RabbitMQ node yet, and stop_everything at exit. RabbitMQ's node will register with an epmd of
# the run's own, on a free port, so the run neither depends on nor stops an epmd that other
# RabbitMQ nodes on the machine use.
begin_run() {
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    PIDS=()
    RABBIT_NODE=""
    RABBIT_PID=""
    EPMD_PORT=""
    trap stop_everything EXIT
    trap 'exit 130' INT TERM
}

# Stops the RabbitMQ node start_rabbitmq_node started, if it still runs.
stop_rabbitmq_node() {
    if [[ -n ${RABBIT_NODE:-} && -n ${RABBIT_PID:-} ]] && kill -0 "$RABBIT_PID" 2>/dev/null; then
        log "stopping RabbitMQ node $RABBIT_NODE"
        ERL_EPMD_PORT=$EPMD_PORT timeout 30 "$RABBIT_SBIN/rabbitmqctl" -n "$RABBIT_NODE" stop >/dev/null 2>&1 || true
    fi
    RABBIT_PID=""
}

# The end of a run (EXIT trap): stops the RabbitMQ node, then every process in PIDS (TERM, KILL
# half a second later), and removes $WORK.
stop_everything() {
    local pid
    stop_rabbitmq_node
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}

# Builds the release binaries of warren-perf and the given packages (unless SKIP_BUILD is set).
# If they do not build, the run measures RabbitMQ only: WARREN_OK=0 and WARREN_WHY say so; a
# warren-perf that does not build ends the run. Needs ROOT and WORK.
# shellcheck disable=SC2034  # WARREN_OK and WARREN_WHY are read by the scripts that source this
build_release() {
    WARREN_OK=1
    WARREN_WHY=""
    [[ -z ${SKIP_BUILD:-} ]] || return 0
    log "building $* and warren-perf (release)"
    local args=(-p warren-perf) p
    for p in "$@"; do args+=(-p "$p"); done
    if ! (cd "$ROOT" && cargo build --release "${args[@]}") >"$WORK/build.log" 2>&1; then
        tail -20 "$WORK/build.log" >&2
        log "warren-broker does not build: measuring RabbitMQ only"
        WARREN_OK=0
        WARREN_WHY="does not build"
        (cd "$ROOT" && cargo build --release -p warren-perf) >"$WORK/build-perf.log" 2>&1 ||
            { tail -20 "$WORK/build-perf.log" >&2; die "warren-perf does not build"; }
    fi
}
