# shellcheck shell=bash
# Shell helpers shared by bench/broker-bench.sh and bench/cluster-bench.sh (sourced, not run).
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
