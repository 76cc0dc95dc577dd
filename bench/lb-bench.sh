#!/usr/bin/env bash
# Load balancer benchmark: warren-lb vs HAProxy (Debian package, TCP mode, nbthread 1) vs no proxy,
# side by side in one run on this machine, loopback only.
#
#   bench/lb-bench.sh                 # full run, about 4 minutes
#   DURATION=3 bench/lb-bench.sh      # quick check of the script itself
#
# Measures for each proxy and for a direct connection (reference): iperf3 bulk throughput with one
# and with 8 streams, short connections per second, request/response latency on kept-alive
# connections, and the proxy's resident memory holding ~10,000 idle proxied connections.
# warren-lb runs twice: with its default (one connection thread per CPU; a new connection stays on
# the first thread until that one is busy) and with one thread, the fair match for HAProxy's
# nbthread 1. Prints a table with warren/HAProxy ratios and writes
# JSON under $RESULTS. Everything it starts is stopped on exit.
#
# Environment (all optional):
#   DURATION=10        seconds of each iperf3, cps and latency test (1-connection latency: half)
#   ROUNDS=1           repeat the whole sequence, report medians (all rounds kept in JSON)
#   CPS_CONCURRENCY=32 LATENCY_CONNECTIONS=32 SIZE=64
#   IDLE_COUNT=10000   idle connections (lowered to fit the open-files limit) IDLE_HOLD=5
#   TOOL_THREADS=1     worker threads of the load tool and of the echo backend
#   RESULTS=dir        where JSON goes (default $CARGO_TARGET_DIR/lb-bench/<UTC time>)
#   CARGO_TARGET_DIR   where the release binaries are built (default target/)
#   SKIP_BUILD=1       use the binaries already built
#   LB_VARIANTS="default 1 rules"  warren-lb variants: "default" (one thread per CPU) or a
#                      thread count (--threads), optionally with "-nosplice" (buffered copy only), e.g.
#                      "1 1-nosplice"; "rules" is the default runtime with fault rules configured
#                      that never fire (a generated config), measured with iperf3 only and
#                      reported against the no-rules warren-lb (cost of idle chaos rules)
#   HAPROXY_SPLICE=1   add `option splice-auto` to HAProxy (off by default: stock TCP mode)
#   BENCH_NICE=-10     run the benchmark (proxies, backends, tools) at this nice value, and its
#                      session's autogroup too (root only for negative values), to be less
#                      disturbed by other work on the machine; use with `setsid -w bench/lb-bench.sh`
#   PIN=1              proxies on CPU 1, load tools and backends on CPU 0 (default: no pinning;
#                      proxies, iperf3, the echo backend and the load tool then share both cores)
#   TESTS="iperf cps latency idle"  which tests run; add "amqp" for the AMQP round trip through
#                      each proxy to a warren-broker (warren-perf, one confirm in flight per
#                      producer: 1 KiB transient publishes, AMQP_PRODUCERS producers, auto-ack consumer)
#   AMQP_PRODUCERS="1 32"  producer counts of the amqp test (one connection and one confirm each)
#   LB_BASE=path       an earlier warren-lb binary, measured as variant "base" (its default),
#                      e.g. LB_VARIANTS="base default": before and after in the same run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
CPS_CONCURRENCY=${CPS_CONCURRENCY:-32}
LATENCY_CONNECTIONS=${LATENCY_CONNECTIONS:-32}
SIZE=${SIZE:-64}
IDLE_COUNT=${IDLE_COUNT:-10000}
IDLE_HOLD=${IDLE_HOLD:-5}
TOOL_THREADS=${TOOL_THREADS:-1}
LB_VARIANTS=${LB_VARIANTS:-default 1 rules}
ROUNDS=${ROUNDS:-1}
HAPROXY_SPLICE=${HAPROXY_SPLICE:-0}
PIN=${PIN:-0}
TESTS=${TESTS:-iperf cps latency idle}
AMQP_PRODUCERS=${AMQP_PRODUCERS:-1 32}
LB_BASE=${LB_BASE:-}
has_test() { [[ " $TESTS " == *" $1 "* ]]; }
LATENCY1_DURATION=$((DURATION / 2 > 3 ? DURATION / 2 : 3))
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$TARGET_DIR/lb-bench/$STAMP}
BIN=$TARGET_DIR/release

log() { printf '[lb-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in iperf3 haproxy jq ss timeout; do
    command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install iperf3 haproxy jq)"
done

# ---------------------------------------------------------------- cleanup: stop what we started
WORK=$(mktemp -d /tmp/lb-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.3
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- priority, limits
if [[ -n ${BENCH_NICE:-} ]]; then
    renice -n "$BENCH_NICE" -p $$ >/dev/null || die "cannot renice to $BENCH_NICE"
    # With autogroup scheduling (kernel.sched_autogroup_enabled=1) nice only ranks tasks inside one
    # session; between sessions the autogroup's own nice counts. Start the script with `setsid -w`
    # so that this changes only the benchmark's session.
    if [[ -w /proc/self/autogroup ]]; then
        echo "$BENCH_NICE" >/proc/self/autogroup 2>/dev/null || log "could not set the autogroup nice"
    fi
fi
# 2 fds per proxied connection: raise the soft limit as far as the hard limit allows.
HARD=$(ulimit -Hn)
[[ $HARD == unlimited ]] && HARD=1048576
WANT=65536
((HARD < WANT)) && WANT=$HARD
ulimit -n "$WANT"
NOFILE=$(ulimit -n)
# HAProxy needs 2*maxconn+ fds and refuses to start otherwise; keep it (and the idle count) inside.
HAPROXY_MAXCONN=20000
(((NOFILE - 40) / 2 < HAPROXY_MAXCONN)) && HAPROXY_MAXCONN=$(((NOFILE - 40) / 2))
IDLE=$IDLE_COUNT
((IDLE > HAPROXY_MAXCONN - 30)) && IDLE=$((HAPROXY_MAXCONN - 30))
if ((IDLE < IDLE_COUNT)); then
    log "open-files limit $NOFILE (hard $HARD): idle test uses $IDLE connections, HAProxy maxconn $HAPROXY_MAXCONN"
fi

# ---------------------------------------------------------------- build
mkdir -p "$RESULTS/raw"
LB_OK=1
LB_WHY=""
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries in $TARGET_DIR"
    EXTRA_PKGS=()
    has_test amqp && EXTRA_PKGS=(-p warren-broker -p warren-perf)
    if ! CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p warren-lb -p warren-tcpbench "${EXTRA_PKGS[@]}" \
        --manifest-path "$ROOT/Cargo.toml" >"$RESULTS/raw/build.log" 2>&1; then
        LB_OK=0
        LB_WHY="warren-lb does not build (see $RESULTS/raw/build.log)"
        CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p warren-tcpbench \
            --manifest-path "$ROOT/Cargo.toml" >>"$RESULTS/raw/build.log" 2>&1 ||
            die "warren-tcpbench does not build (see $RESULTS/raw/build.log)"
    fi
fi
TB=$BIN/warren-tcpbench
LB=$BIN/warren-lb
[[ -x $TB ]] || die "no $TB"
if ((LB_OK)) && [[ ! -x $LB ]]; then
    LB_OK=0
    LB_WHY="no $LB binary"
fi

# ---------------------------------------------------------------- helpers
P_PROXY=()
P_TOOL=()
if [[ $PIN == 1 ]]; then
    command -v taskset >/dev/null || die "PIN=1 needs taskset"
    P_PROXY=(taskset -c 1)
    P_TOOL=(taskset -c 0)
fi
port_busy() { [[ -n $(ss -Htan "( sport = :$1 )" 2>/dev/null) ]]; }
free_port() {
    local p i
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000)) # below the ephemeral range
        port_busy "$p" || { echo "$p"; return 0; }
    done
    die "no free port found"
}
wait_port() { # wait until something listens on 127.0.0.1:$1
    local i
    for i in $(seq 1 100); do
        [[ -n $(ss -Htln "( sport = :$1 )" 2>/dev/null) ]] && return 0
        sleep 0.05
    done
    return 1
}
# wait for a regex in a file and print the first capture group
wait_line() { # file regex seconds [exclude-regex]
    local i n=$(($3 * 20)) v
    for i in $(seq 1 "$n"); do
        v=$(grep -Ev "${4:-^\$}" "$1" 2>/dev/null | sed -nE "s/.*$2.*/\1/p" | head -n1)
        [[ -n $v ]] && { echo "$v"; return 0; }
        sleep 0.05
    done
    return 1
}
cpu_ticks() { # utime+stime of a whole process, clock ticks
    [[ -n $1 && -r /proc/$1/stat ]] || { echo ""; return 0; }
    awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
CLK_TCK=$(getconf CLK_TCK)
now_s() { date +%s.%N; }

# ---------------------------------------------------------------- backends
IPERF_PORT=$(free_port)
"${P_TOOL[@]}" iperf3 -s -p "$IPERF_PORT" --bind 127.0.0.1 >"$RESULTS/raw/iperf3-server.log" 2>&1 &
PIDS+=($!)
wait_port "$IPERF_PORT" || die "iperf3 -s did not start (see $RESULTS/raw/iperf3-server.log)"
IPERF_BACKEND=127.0.0.1:$IPERF_PORT

"${P_TOOL[@]}" "$TB" --threads "$TOOL_THREADS" echo-server --listen 127.0.0.1:0 --lifetime 20m \
    >"$WORK/echo.out" 2>"$RESULTS/raw/echo-server.log" &
PIDS+=($!)
ECHO_BACKEND=$(wait_line "$WORK/echo.out" 'listening addr=(\S+)' 5) || die "echo-server did not start"
log "backends: iperf3 $IPERF_BACKEND, echo $ECHO_BACKEND${AMQP_BACKEND:+, warren-broker $AMQP_BACKEND}"

AMQP_BACKEND=""
PERF=$BIN/warren-perf
if has_test amqp; then
    [[ -x $BIN/warren-broker && -x $PERF ]] || die "the amqp test needs $BIN/warren-broker and $PERF"
    "${P_TOOL[@]}" env RUST_LOG=info "$BIN/warren-broker" --amqp 127.0.0.1:0 --mgmt 127.0.0.1:0 \
        --prometheus 127.0.0.1:0 --data-dir "$WORK/broker-data" >/dev/null 2>"$RESULTS/raw/broker.log" &
    PIDS+=($!)
    AMQP_BACKEND=$(wait_line "$RESULTS/raw/broker.log" 'listening proto=amqp addr=([0-9.:]+)' 10) ||
        die "warren-broker did not start (see $RESULTS/raw/broker.log)"
fi

# Targets: name -> iperf, echo and AMQP addresses, proxy pids (for CPU and RSS).
NAMES=(direct)
declare -A IPERF_ADDR=([direct]=$IPERF_BACKEND) ECHO_ADDR=([direct]=$ECHO_BACKEND) AMQP_ADDR=([direct]=$AMQP_BACKEND)
declare -A IPERF_PID=([direct]="") ECHO_PID=([direct]="") AMQP_PID=([direct]="") LABEL=([direct]="direct")

# ---------------------------------------------------------------- HAProxy
HP_IPERF=$(free_port)
HP_ECHO=$(free_port)
while [[ $HP_ECHO == "$HP_IPERF" ]]; do HP_ECHO=$(free_port); done
HP_AMQP=$(free_port)
while [[ $HP_AMQP == "$HP_IPERF" || $HP_AMQP == "$HP_ECHO" ]]; do HP_AMQP=$(free_port); done
SPLICE=""
[[ $HAPROXY_SPLICE == 1 ]] && SPLICE="  option splice-auto"
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $HAPROXY_MAXCONN

defaults
  mode tcp
  maxconn $HAPROXY_MAXCONN
  timeout client 60s
  timeout server 60s
  timeout connect 5s
$SPLICE

frontend fe_iperf
  bind 127.0.0.1:$HP_IPERF
  default_backend be_iperf

backend be_iperf
  server iperf $IPERF_BACKEND

frontend fe_echo
  bind 127.0.0.1:$HP_ECHO
  default_backend be_echo

backend be_echo
  server echo $ECHO_BACKEND
EOF
if [[ -n $AMQP_BACKEND ]]; then
    cat >>"$WORK/haproxy.cfg" <<EOF

frontend fe_amqp
  bind 127.0.0.1:$HP_AMQP
  default_backend be_amqp

backend be_amqp
  server amqp $AMQP_BACKEND
EOF
fi
cp "$WORK/haproxy.cfg" "$RESULTS/haproxy.cfg"
"${P_PROXY[@]}" haproxy -f "$WORK/haproxy.cfg" -db >"$RESULTS/raw/haproxy.log" 2>&1 &
HP_PID=$!
PIDS+=("$HP_PID")
if wait_port "$HP_IPERF" && wait_port "$HP_ECHO" && { [[ -z $AMQP_BACKEND ]] || wait_port "$HP_AMQP"; }; then
    NAMES+=(haproxy)
    IPERF_ADDR[haproxy]=127.0.0.1:$HP_IPERF
    ECHO_ADDR[haproxy]=127.0.0.1:$HP_ECHO
    IPERF_PID[haproxy]=$HP_PID
    ECHO_PID[haproxy]=$HP_PID
    AMQP_PID[haproxy]=$HP_PID
    AMQP_ADDR[haproxy]=""
    [[ -n $AMQP_BACKEND ]] && AMQP_ADDR[haproxy]=127.0.0.1:$HP_AMQP
    LABEL[haproxy]="haproxy"
    log "haproxy (pid $HP_PID): iperf ${IPERF_ADDR[haproxy]}, echo ${ECHO_ADDR[haproxy]}"
else
    log "HAProxy did not start: $(tail -n 3 "$RESULTS/raw/haproxy.log")"
fi

# ---------------------------------------------------------------- warren-lb
# One process per listener with the one-listener flags (what every warren-lb build offers); the
# single-worker variant uses --threads if the binary has it, else the tokio runtime's
# TOKIO_WORKER_THREADS. The bound address is read from stderr (docs/CONTRACTS.md).
LB_THREADS_HOW=""
if ((LB_OK)); then
    LB_HELP=$("$LB" --help 2>&1 || true)
    if grep -q -- '--threads' <<<"$LB_HELP"; then LB_THREADS_HOW="--threads"; else LB_THREADS_HOW="TOKIO_WORKER_THREADS"; fi
fi
LB_PID=""
LB_ADDR=""
variant_name() { # default -> warren-lb, 1 -> warren-lb-1t, 1-nosplice -> warren-lb-1t-nosplice
    [[ $1 == rules ]] && { echo warren-lb-rules; return; }
    [[ $1 == base ]] && { echo warren-lb-base; return; }
    local t=${1%%-*} rest=""
    [[ $1 == *-* ]] && rest=-${1#*-}
    if [[ $t == default ]]; then echo "warren-lb$rest"; else echo "warren-lb-${t}t$rest"; fi
}
rules_config() { # file backend: one listener with fault rules that are configured but never fire
    cat >"$1" <<EOF
[[listener]]
name = "bench"
bind = "127.0.0.1:0"
backends = ["$2"]
max_connections = $((IDLE + 1000))

[[listener.fault]]
name = "periodic"
kind = "reset"
every = "1h"

[[listener.fault]]
name = "old"
kind = "reset"
lifetime = "1h"

[[listener.fault]]
name = "rare"
kind = "reset"
rate = "1/day"

[[listener.fault]]
name = "publish"
kind = "reset"
on_amqp = "basic.publish"
toxicity = 0

[[listener.fault]]
name = "slow"
kind = "latency"
latency = "50ms"
enabled = false
EOF
}
start_lb() { # log-name backend variant; sets LB_PID and LB_ADDR
    local name=$1 backend=$2 threads=${3%%-*} args=() envs=() bin=$LB
    args=(--listen 127.0.0.1:0 --backend "$backend")
    if [[ $3 == base ]]; then
        [[ -x $LB_BASE ]] || { log "variant base needs LB_BASE=<warren-lb binary>"; return 1; }
        bin=$LB_BASE
        threads=default
    fi
    if [[ $3 == rules ]]; then
        threads=default
        rules_config "$RESULTS/raw/$name.toml" "$backend"
        "$LB" --check-config "$RESULTS/raw/$name.toml" >"$RESULTS/raw/$name.check" 2>&1 ||
            { log "rules config rejected: $(cat "$RESULTS/raw/$name.check")"; return 1; }
        args=(--config "$RESULTS/raw/$name.toml")
    fi
    # room for the idle test beyond the default limit of 10,000 (only if this build has the flag)
    [[ $3 != rules ]] && grep -q -- '--max-connections' <<<"$LB_HELP" && args+=(--max-connections $((IDLE + 1000)))
    if [[ $3 == *-nosplice ]]; then
        grep -q -- '--no-splice' <<<"$LB_HELP" || { log "this warren-lb has no --no-splice"; return 1; }
        args+=(--no-splice)
    fi
    if [[ $threads != default ]]; then
        if [[ $LB_THREADS_HOW == --threads ]]; then args+=(--threads "$threads"); else envs=(TOKIO_WORKER_THREADS="$threads"); fi
    fi
    "${P_PROXY[@]}" env "${envs[@]}" RUST_LOG=info "$bin" "${args[@]}" >/dev/null 2>"$RESULTS/raw/$name.log" &
    LB_PID=$!
    PIDS+=("$LB_PID")
    LB_ADDR=$(wait_line "$RESULTS/raw/$name.log" 'listening listener=[^ ]+ addr=([0-9.:]+)' 5 'listener=admin')
}
if ((LB_OK)); then
    for v in $LB_VARIANTS; do
        name=$(variant_name "$v")
        if start_lb "$name-iperf" "$IPERF_BACKEND" "$v" && a="$LB_PID $LB_ADDR" &&
            start_lb "$name-echo" "$ECHO_BACKEND" "$v" && b="$LB_PID $LB_ADDR"; then
            NAMES+=("$name")
            IPERF_PID[$name]=${a%% *}
            IPERF_ADDR[$name]=${a#* }
            ECHO_PID[$name]=${b%% *}
            ECHO_ADDR[$name]=${b#* }
            AMQP_PID[$name]=""
            AMQP_ADDR[$name]=""
            if [[ -n $AMQP_BACKEND && $v != rules ]] && start_lb "$name-amqp" "$AMQP_BACKEND" "$v"; then
                AMQP_PID[$name]=$LB_PID
                AMQP_ADDR[$name]=$LB_ADDR
            fi
            LABEL[$name]=$name
            log "$name (variant $v, threads via ${LB_THREADS_HOW:-default}): iperf ${IPERF_ADDR[$name]} (pid ${IPERF_PID[$name]}), echo ${ECHO_ADDR[$name]} (pid ${ECHO_PID[$name]})"
        else
            LB_OK=0
            LB_WHY="warren-lb did not report a listening address: $(tail -n 3 "$RESULTS/raw/$name-iperf.log" "$RESULTS/raw/$name-echo.log" 2>/dev/null | tr '\n' ' ')"
            break
        fi
    done
fi
if ((!LB_OK)); then
    log "warren-lb UNAVAILABLE: $LB_WHY"
fi

# ---------------------------------------------------------------- checks: every target echoes
for n in "${NAMES[@]}"; do
    if ! timeout 20 "$TB" idle --target "${ECHO_ADDR[$n]}" --count 4 --hold 0s --json >"$WORK/check.json" 2>/dev/null ||
        [[ $(jq -r '.alive_after_hold' "$WORK/check.json") != 4 ]]; then
        log "$n does not proxy the echo backend correctly: $(cat "$WORK/check.json" 2>/dev/null)"
        [[ $n == direct ]] && die "echo backend broken"
    fi
done

# ---------------------------------------------------------------- measurements
declare -A M  # "name metric" -> value reported (median over the rounds)
declare -A MV # "name metric" -> every round's value
TSV=$RESULTS/rounds.tsv
: >"$TSV"
ROUND=1
put() { MV["$1 $2"]+="$3 "; printf '%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$2" "$3" >>"$TSV"; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# run "$@" while sampling the CPU time of proxy pid $1 (name, metric prefix follow)
# The proxy's CPU time per unit of work (per GB, per connection, per request) is the figure least
# disturbed by other load on the machine: waiting for a CPU costs time, not CPU time. Test functions
# set WORK_DONE (bytes, connections or requests) and WORK_SCALE (the unit: 1e9 for bytes = per GB).
WORK_DONE=""
WORK_SCALE=1
with_cpu() { # pid name key cmd...
    local pid=$1 name=$2 key=$3 t0 t1 c0 c1
    shift 3
    WORK_DONE=""
    c0=$(cpu_ticks "$pid")
    t0=$(now_s)
    "$@"
    t1=$(now_s)
    c1=$(cpu_ticks "$pid")
    if [[ -n $c0 && -n $c1 ]]; then
        put "$name" "${key}_proxy_cpu_pct" "$(awk -v a="$c0" -v b="$c1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" \
            'BEGIN { printf "%.0f", (b - a) / hz / (t1 - t0) * 100 }')"
        if [[ -n $WORK_DONE && $WORK_DONE != 0 ]]; then
            # microseconds of proxy CPU per unit (per GB: ms are more readable, see the table)
            put "$name" "${key}_proxy_cpu_us_per" "$(awk -v a="$c0" -v b="$c1" -v hz="$CLK_TCK" -v w="$WORK_DONE" -v u="$WORK_SCALE" \
                'BEGIN { printf "%.2f", (b - a) / hz * 1e6 / (w / u) }')"
        fi
    fi
}

iperf_test() { # name streams
    local n=$1 p=$2 out=$RESULTS/raw/r$ROUND-$1-iperf-P$2.json addr=${IPERF_ADDR[$1]}
    timeout $((DURATION + 30)) "${P_TOOL[@]}" iperf3 -c "${addr%:*}" -p "${addr##*:}" -t "$DURATION" -P "$p" -J >"$out" 2>&1 || true
    local bps
    bps=$(jq -r '.end.sum_received.bits_per_second // empty' "$out" 2>/dev/null || true)
    WORK_DONE=$(jq -r '.end.sum_received.bytes // empty' "$out" 2>/dev/null || true)
    WORK_SCALE=1e9
    if [[ -n $bps ]]; then
        put "$n" "iperf_P${p}_gbps" "$(awk -v b="$bps" 'BEGIN { printf "%.2f", b / 1e9 }')"
        log "$n iperf3 -P $p: $(awk -v b="$bps" 'BEGIN { printf "%.2f", b / 1e9 }') Gbit/s"
    else
        log "$n iperf3 -P $p failed: $(jq -r '.error // empty' "$out" 2>/dev/null | head -c 200)"
    fi
}

cps_test() {
    local n=$1 out=$RESULTS/raw/r$ROUND-$1-cps.json
    timeout $((DURATION + 30)) "${P_TOOL[@]}" "$TB" --threads "$TOOL_THREADS" --json cps --target "${ECHO_ADDR[$n]}" \
        --duration "${DURATION}s" --concurrency "$CPS_CONCURRENCY" --size "$SIZE" >"$out" 2>/dev/null || true
    if jq -e .conn_per_s "$out" >/dev/null 2>&1; then
        put "$n" cps "$(jq -r '.conn_per_s | floor' "$out")"
        WORK_DONE=$(jq -r '.connections' "$out")
        WORK_SCALE=1
        put "$n" cps_errors "$(jq -r '.errors.total' "$out")"
        log "$n cps: $(jq -r '"\(.conn_per_s | floor) conn/s, errors \(.errors.total)"' "$out")"
    else
        log "$n cps failed"
    fi
}

latency_test() { # name connections seconds key-prefix
    local n=$1 c=$2 d=$3 k=$4 out=$RESULTS/raw/r$ROUND-$1-latency-c$2.json
    timeout $((d + 30)) "${P_TOOL[@]}" "$TB" --threads "$TOOL_THREADS" --json latency --target "${ECHO_ADDR[$n]}" \
        --duration "${d}s" --connections "$c" --size "$SIZE" >"$out" 2>/dev/null || true
    if jq -e .latency_us "$out" >/dev/null 2>&1; then
        put "$n" "${k}rps" "$(jq -r '.req_per_s | floor' "$out")"
        # requests in the warm-up are not in the histogram but cost CPU too: count them by rate
        WORK_DONE=$(jq -r '.requests / .elapsed_s * (.elapsed_s + 1) | floor' "$out")
        WORK_SCALE=1
        put "$n" "${k}p50_us" "$(jq -r '.latency_us.p50 * 10 | round / 10' "$out")"
        put "$n" "${k}p99_us" "$(jq -r '.latency_us.p99 * 10 | round / 10' "$out")"
        put "$n" "${k}p999_us" "$(jq -r '.latency_us.p999 * 10 | round / 10' "$out")"
        put "$n" "${k}latency_errors" "$(jq -r '.errors.total' "$out")"
        log "$n latency, $c connections: $(jq -r '"\(.req_per_s | floor) req/s p50 \(.latency_us.p50)us p99 \(.latency_us.p99)us errors \(.errors.total)"' "$out")"
    else
        log "$n latency ($c connections) failed"
    fi
}

idle_test() {
    local n=$1 out=$RESULTS/raw/r$ROUND-$1-idle.json pid=${ECHO_PID[$1]}
    timeout $((IDLE_HOLD + 90)) "${P_TOOL[@]}" "$TB" --threads "$TOOL_THREADS" --json idle --target "${ECHO_ADDR[$n]}" \
        --count "$IDLE" --hold "${IDLE_HOLD}s" --size "$SIZE" --rss-pid "$pid" \
        >"$out" 2>"$RESULTS/raw/$n-idle.log" || true
    if jq -e .rss_held_kib "$out" >/dev/null 2>&1; then
        put "$n" idle_established "$(jq -r .established "$out")"
        put "$n" idle_alive "$(jq -r .alive_after_hold "$out")"
        put "$n" rss_before_mib "$(jq -r '.rss_before_kib / 1024 * 10 | round / 10' "$out")"
        put "$n" rss_idle_mib "$(jq -r '.rss_held_kib / 1024 * 10 | round / 10' "$out")"
        put "$n" rss_peak_mib "$(jq -r '[.rss_established_kib, .rss_held_kib] | max / 1024 * 10 | round / 10' "$out")"
        put "$n" kib_per_conn "$(jq -r '.per_conn_kib * 10 | round / 10' "$out")"
        # linear estimate at exactly 10,000 connections when the fd limit forced fewer
        put "$n" rss_10k_mib "$(jq -r '(.rss_before_kib + .per_conn_kib * 10000) / 1024 * 10 | round / 10' "$out")"
        log "$n idle: $(jq -r '"\(.established) established, \(.alive_after_hold) alive after hold, RSS \(.rss_before_kib / 1024 | floor) -> \(.rss_held_kib / 1024 | floor) MiB (\(.per_conn_kib * 10 | round / 10) KiB/conn)"' "$out")"
    else
        log "$n idle failed: $(tail -n 2 "$RESULTS/raw/$n-idle.log")"
    fi
}

amqp_test() { # name producers key-prefix: one confirm in flight per producer, 1 KiB transient
    local n=$1 x=$2 k=$3 out=$RESULTS/raw/r$ROUND-$1-amqp-x$2.json addr=${AMQP_ADDR[$1]}
    [[ -n $addr ]] || return 0
    timeout $((DURATION + 60)) "${P_TOOL[@]}" "$PERF" --uri "amqp://guest:guest@$addr/%2f" \
        -x "$x" -y 1 -s 1024 -c 1 -a -z "$DURATION" -u "lb-bench-$n-x$x-r$ROUND" \
        --json-out "$out" >"$RESULTS/raw/r$ROUND-$n-amqp-x$x.log" 2>&1 || true
    if jq -e .confirm_latency_us.p50 "$out" >/dev/null 2>&1; then
        put "$n" "${k}msgs" "$(jq -r '.confirmed_rate | floor' "$out")"
        WORK_DONE=$(jq -r '.confirmed' "$out")
        WORK_SCALE=1
        put "$n" "${k}p50_us" "$(jq -r '.confirm_latency_us.p50 * 10 | round / 10' "$out")"
        put "$n" "${k}p99_us" "$(jq -r '.confirm_latency_us.p99 * 10 | round / 10' "$out")"
        log "$n amqp, $x producer(s): $(jq -r '"\(.confirmed_rate | floor) confirmed/s, confirm p50 \(.confirm_latency_us.p50)us p99 \(.confirm_latency_us.p99)us"' "$out")"
    else
        log "$n amqp ($x producers) failed: $(tail -n 2 "$RESULTS/raw/r$ROUND-$n-amqp-x$x.log")"
    fi
}

UPTIME_START=$(uptime)
log "start: $UPTIME_START"
T_START=$(date +%s)
# Test-major order: every target runs one test before the next test starts, so a change in the
# background load hits all targets alike.
# ROUNDS > 1 repeats the sequence and reports each figure's median.
for ROUND in $(seq 1 "$ROUNDS"); do
    log "round $ROUND of $ROUNDS, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    if has_test iperf; then
        for n in "${NAMES[@]}"; do with_cpu "${IPERF_PID[$n]}" "$n" iperf_P1 iperf_test "$n" 1; done
        for n in "${NAMES[@]}"; do with_cpu "${IPERF_PID[$n]}" "$n" iperf_P8 iperf_test "$n" 8; done
    fi
    # the rules variant is measured with iperf3 only (its cost on the copy path)
    if has_test cps; then
        for n in "${NAMES[@]}"; do [[ $n == warren-lb-rules ]] || with_cpu "${ECHO_PID[$n]}" "$n" cps cps_test "$n"; done
    fi
    if has_test latency; then
        for n in "${NAMES[@]}"; do [[ $n == warren-lb-rules ]] || with_cpu "${ECHO_PID[$n]}" "$n" latency1 latency_test "$n" 1 "$LATENCY1_DURATION" l1_; done
        for n in "${NAMES[@]}"; do [[ $n == warren-lb-rules ]] || with_cpu "${ECHO_PID[$n]}" "$n" latency latency_test "$n" "$LATENCY_CONNECTIONS" "$DURATION" ""; done
    fi
    if has_test amqp; then
        for x in $AMQP_PRODUCERS; do
            for n in "${NAMES[@]}"; do
                [[ -n ${AMQP_ADDR[$n]:-} ]] && with_cpu "${AMQP_PID[$n]}" "$n" "amqp$x" amqp_test "$n" "$x" "amqp${x}_"
            done
        done
    fi
done
ROUND=1
if has_test idle; then
    for n in "${NAMES[@]}"; do [[ $n == direct || $n == warren-lb-rules ]] || idle_test "$n"; done
fi
for k in "${!MV[@]}"; do
    # shellcheck disable=SC2086 # word splitting of the value list is intended
    M[$k]=$(median ${MV[$k]})
done
for k in "${!M[@]}"; do # per GB: microseconds -> milliseconds
    [[ $k == *iperf_P?_proxy_cpu_us_per ]] && M[${k%_us_per}_ms_per_gb]=$(awk -v v="${M[$k]}" 'BEGIN { printf "%.1f", v / 1000 }')
done
UPTIME_END=$(uptime)
log "end: $UPTIME_END ($(($(date +%s) - T_START))s of measurements)"

# ---------------------------------------------------------------- report
ALL=(direct haproxy)
for v in $LB_VARIANTS; do ALL+=("$(variant_name "$v")"); done
LBS=("${ALL[@]:2}")

ROWS=(
    "iperf_P1_gbps|iperf3 1 stream, Gbit/s|>= 1.3x"
    "iperf_P8_gbps|iperf3 8 streams, Gbit/s|>= 1.3x"
    "cps|short connections/s|>= 1x"
    "l1_rps|req/s, 1 connection|"
    "l1_p50_us|latency p50, 1 conn, us|<= 1x"
    "l1_p99_us|latency p99, 1 conn, us|<= 1x"
    "rps|req/s, ${LATENCY_CONNECTIONS} conns|"
    "p50_us|latency p50, ${LATENCY_CONNECTIONS} conns, us|<= 1x"
    "p99_us|latency p99, ${LATENCY_CONNECTIONS} conns, us|<= 1x"
    "p999_us|latency p99.9, ${LATENCY_CONNECTIONS} conns, us|"
    "rss_before_mib|RSS at start, MiB|"
    "rss_idle_mib|RSS with $IDLE idle conns, MiB|"
    "kib_per_conn|RSS per idle conn, KiB|"
    "rss_10k_mib|RSS est. at 10,000 conns, MiB|< 150 MB"
    "iperf_P1_proxy_cpu_pct|proxy CPU % (iperf3 1 stream)|"
    "iperf_P8_proxy_cpu_pct|proxy CPU % (iperf3 8 streams)|"
    "cps_proxy_cpu_pct|proxy CPU % (cps)|"
    "latency1_proxy_cpu_pct|proxy CPU % (latency, 1 conn)|"
    "latency_proxy_cpu_pct|proxy CPU % (latency, ${LATENCY_CONNECTIONS} conns)|"
    "iperf_P1_proxy_cpu_ms_per_gb|proxy CPU ms per GB, 1 stream|"
    "iperf_P8_proxy_cpu_ms_per_gb|proxy CPU ms per GB, 8 streams|"
    "cps_proxy_cpu_us_per|proxy CPU us per connection|"
    "latency1_proxy_cpu_us_per|proxy CPU us per request, 1 conn|"
    "latency_proxy_cpu_us_per|proxy CPU us per request, ${LATENCY_CONNECTIONS} conns|"
)
if has_test amqp; then
    for x in $AMQP_PRODUCERS; do
        ROWS+=(
            "amqp${x}_msgs|AMQP confirm-1, ${x} producer(s), msg/s|"
            "amqp${x}_p50_us|AMQP confirm-1, ${x} prod., p50 us|<= 1x"
            "amqp${x}_p99_us|AMQP confirm-1, ${x} prod., p99 us|"
            "amqp${x}_proxy_cpu_us_per|proxy CPU us per msg, ${x} producer(s)|"
        )
    done
fi
val() { echo "${M["$1 $2"]:--}"; }
num() { # readable figure: integers from 100 up, else 3 significant digits
    [[ $1 == - ]] && { echo -; return; }
    awk -v v="$1" 'BEGIN { a = v < 0 ? -v : v; if (a >= 100) printf "%.0f", v; else if (a >= 10) printf "%.1f", v; else printf "%.2f", v }'
}
ratio() { # lb haproxy
    local a=$1 b=$2
    if [[ $a == - || $b == - ]]; then echo -; else awk -v a="$a" -v b="$b" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; fi
}
{
    printf '%-34s' "metric"
    for n in "${ALL[@]}"; do printf '%22s' "$n"; done
    for n in "${LBS[@]}"; do printf '%22s' "${n#warren-}/hap"; done
    printf '  %s\n' "target"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r key title target <<<"$row"
        printf '%-34s' "$title"
        for n in "${ALL[@]}"; do printf '%22s' "$(num "$(val "$n" "$key")")"; done
        for n in "${LBS[@]}"; do printf '%22s' "$(ratio "$(val "$n" "$key")" "$(val haproxy "$key")")"; done
        printf '  %s\n' "$target"
    done
    if [[ " ${LBS[*]} " == *" warren-lb-rules "* ]]; then
        for p in 1 8; do
            printf 'iperf3 %s stream(s): warren-lb-rules / warren-lb = %s  (target: within 5%%)\n' "$p" \
                "$(ratio "$(val warren-lb-rules "iperf_P${p}_gbps")" "$(val warren-lb "iperf_P${p}_gbps")")"
        done
    fi
} | tee "$RESULTS/table.txt"
((LB_OK)) || echo "warren-lb UNAVAILABLE: $LB_WHY" | tee -a "$RESULTS/table.txt"
# the same table in Markdown, for docs/benchmarks.md
{
    printf '| metric |'
    for n in "${ALL[@]}"; do printf ' %s |' "$n"; done
    for n in "${LBS[@]}"; do printf ' %s / haproxy |' "$n"; done
    printf ' target |\n|---|'
    for n in "${ALL[@]}" "${LBS[@]}"; do printf -- '---:|'; done
    printf -- '---|\n'
    for row in "${ROWS[@]}"; do
        IFS='|' read -r key title target <<<"$row"
        printf '| %s |' "$title"
        for n in "${ALL[@]}"; do printf ' %s |' "$(num "$(val "$n" "$key")")"; done
        for n in "${LBS[@]}"; do printf ' %s |' "$(ratio "$(val "$n" "$key")" "$(val haproxy "$key")")"; done
        printf ' %s |\n' "$target"
    done
} >"$RESULTS/table.md"

MEDIANS=$(for k in "${!M[@]}"; do printf '%s\t%s\t%s\n' "${k%% *}" "${k#* }" "${M[$k]}"; done | sort)
jq -n -R \
    --arg medians "$MEDIANS" \
    --arg date "$STAMP" \
    --arg nproc "$(nproc)" \
    --arg cpu "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)" \
    --arg kernel "$(uname -r)" \
    --arg haproxy "$(haproxy -v 2>&1 | head -n1)" \
    --arg iperf3 "$(iperf3 --version 2>&1 | head -n1)" \
    --arg rev "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg uptime_start "$UPTIME_START" --arg uptime_end "$UPTIME_END" \
    --arg duration "$DURATION" --arg rounds "$ROUNDS" --arg idle "$IDLE" --arg nofile "$NOFILE" \
    --arg haproxy_maxconn "$HAPROXY_MAXCONN" --arg lb_ok "$LB_OK" --arg lb_why "$LB_WHY" \
    --arg lb_threads_how "$LB_THREADS_HOW" --arg tool_threads "$TOOL_THREADS" --arg pin "$PIN" --arg nice "${BENCH_NICE:-0}" --arg splice "$HAPROXY_SPLICE" \
    --arg cps_conc "$CPS_CONCURRENCY" --arg lat_conns "$LATENCY_CONNECTIONS" --arg size "$SIZE" \
    '{
      date: $date, nproc: ($nproc | tonumber), cpu: $cpu, kernel: $kernel, haproxy: $haproxy,
      iperf3: $iperf3, git: $rev, uptime_start: $uptime_start, uptime_end: $uptime_end,
      settings: { duration_s: ($duration | tonumber), rounds: ($rounds | tonumber),
                  idle_connections: ($idle | tonumber),
                  nofile: ($nofile | tonumber), haproxy_maxconn: ($haproxy_maxconn | tonumber),
                  tool_threads: ($tool_threads | tonumber), cps_concurrency: ($cps_conc | tonumber),
                  latency_connections: ($lat_conns | tonumber), size: ($size | tonumber),
                  warren_lb_threads_via: $lb_threads_how, pinned: ($pin == "1"), nice: ($nice | tonumber),
                  haproxy_splice: ($splice == "1") },
      warren_lb_available: ($lb_ok == "1"), warren_lb_unavailable_reason: $lb_why,
      results: ($medians | split("\n") | map(select(length > 0) | split("\t")
                | {t: .[0], k: .[1], v: (.[2] | tonumber? // .)})
                | group_by(.t) | map({key: .[0].t, value: (map({key: .k, value: .v}) | from_entries)})
                | from_entries),
      rounds: ([inputs | split("\t") | {r: (.[0] | tonumber), t: .[1], k: .[2], v: (.[3] | tonumber? // .)}])
    }' \
    <"$TSV" >"$RESULTS/summary.json"
log "results: $RESULTS (summary.json, table.txt, table.md, raw/)"
