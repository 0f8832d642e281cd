#!/usr/bin/env bash
# sip_cps.sh - SIP call-rate (calls/s) ceiling of sipura-proxy, next to SIPp alone and
# SIPp through Kamailio, all on 127.0.0.1 in the same run.
#
#   direct   : SIPp built-in uac -> SIPp built-in uas                     (the tools' floor)
#   proxy    : SIPp uac -> sipura-proxy inside .. outside -> SIPp uas     (the B2BUA)
#   kamailio : SIPp uac -> Kamailio stateful proxy -> SIPp uas            (a C anchor;
#              skipped with a note when `kamailio` is not installed)
#
# Every mode sweeps its call rates in ascending order. Each step runs DUR seconds
# (-m rate*DUR calls, -d 0 = BYE right after ACK) against a fresh uas and a fresh middle
# box (sipura-proxy or Kamailio), and passes when SIPp exits 0, no call failed, every
# call succeeded and the achieved rate is >= 95 % of the target. The ceiling of a mode
# is the highest passing rate before the first failing step (STOP_ON_FAIL=1).
#
# proxy mode: `python3 -m proxy run --config <generated toml>` from the repo root, in the
# background, [log] level "warning", UDP only, no [[line]] (unknown users are relayed),
# upstream = the uas. SIPp's uac sends SDP, so every call allocates media ports (two
# RTP/RTCP pairs: 4 sockets): the [media] range is wide (MEDIA_MIN..MEDIA_MAX).
# CPU is measured from /proc (utime+stime) for the uas and the middle box (all its
# processes), from `times` for the uac, and machine-wide from the cgroup counters.
#
# Usage: bench/sip_cps.sh          (env knobs, defaults below)
#   QUICK=1        DUR=3, a few rates per mode, short timeouts: ~1 minute
#   DUR=10  MODES="direct proxy kamailio"
#   DIRECT_RATES="..." PROXY_RATES="..." KAM_RATES="..."  (RATES sets all three)
#   SIPP_OPTS="-buff_size 4194304"  UAC_OPTS="-default_behaviors all,-abortunexp"
#   STOP_ON_FAIL=1  QUIET_MAX=20 QUIET_WAIT=180  BUSY_RETRY_PCT=25 BUSY_RETRIES=2
#   UAC_TIMEOUT=$((2*DUR+40)) (s, whole uac run; QUICK: DUR+12)
#   PYTHON=python3  MEDIA_MIN=20000 MEDIA_MAX=59999  PROXY_LOG_LEVEL=warning
#   KAM_CHILDREN=4 KAM_SHM_MB=1024 KAM_OPTS="-x tlsf -X tlsf"  KAM_CFG=<own cfg>
#   SUT_PORT=15060 PROXY_OUT_PORT=15062 UAC_PORT=15070 UAS_PORT=15080 (SIP ports; off
#     the usual 5060/5070/5080 that a developer's own proxy may be holding)
#   PYSPY=1  (proxy mode: `py-spy record --pid` the proxy for the whole step, speedscope
#     profile in the step's dir; PYSPY_OPTS="--rate 200". py-spy stops the proxy to
#     sample it, so rates and CPU figures are not those of an unprofiled run)
#   WORK=/tmp/sip_cps/<date> (per step: SIPp csv/screen/errors, proxy.toml + proxy.log,
#     kamailio.cfg + kamailio.log)
# Last line printed:
#   RESULT direct_cps=<n> proxy_cps=<n> kamailio_cps=<n|skipped> (with the CPU at each
#   ceiling); ...
# Takes ~15 min with the defaults (a step is DUR s plus restarts and a quiet-wait; a
# failing step can last up to 2*DUR+40 s).
#
# Only processes started here are stopped, by PID. All traffic is on 127.0.0.1.
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    DUR=${DUR:-3}
    DIRECT_RATES=${DIRECT_RATES:-${RATES:-"1000 4000"}}
    PROXY_RATES=${PROXY_RATES:-${RATES:-"50 200 500"}}
    KAM_RATES=${KAM_RATES:-${RATES:-"1000 3000"}}
    UAC_TIMEOUT=${UAC_TIMEOUT:-$(( DUR + 12 ))}
    QUIET_WAIT=${QUIET_WAIT:-10}
    BUSY_RETRIES=${BUSY_RETRIES:-0}
fi
DUR=${DUR:-10}
DIRECT_RATES=${DIRECT_RATES:-${RATES:-"100 300 1000 2000 4000 6000 8000 10000 12000 14000 16000 18000 20000 22000 25000"}}
PROXY_RATES=${PROXY_RATES:-${RATES:-"50 100 200 300 500 700 1000 1300 1600 2000"}}
KAM_RATES=${KAM_RATES:-${RATES:-"100 300 1000 1500 2000 2500 3000 3500 4000 4500 5000 6000 7000 8000"}}
MODES=${MODES:-"direct proxy kamailio"}
UAC_TIMEOUT=${UAC_TIMEOUT:-$(( DUR * 2 + 40 ))}   # s, whole uac run (-timeout)
STOP_ON_FAIL=${STOP_ON_FAIL:-1}
# A middle box may relay the uas's 180 and 200 out of order (legal for SIP over UDP);
# the strict built-in uac would abort such a call on the late 180. Keep the call going
# instead; such messages are counted in "unexp".
UAC_OPTS=${UAC_OPTS:-"-default_behaviors all,-abortunexp"}
SERVICE=${SERVICE:-1000}        # uac -s: the callee user
# Extra options for both SIPp instances. SIPp's default socket buffer (64 KB) overflows
# on bursts from ~4000 cps on: calls then fail through lost datagrams, not CPU.
SIPP_OPTS=${SIPP_OPTS:-"-buff_size 4194304"}
QUIET_MAX=${QUIET_MAX:-20}      # % of one core; see wait_quiet
QUIET_WAIT=${QUIET_WAIT:-180}   # s
BUSY_RETRY_PCT=${BUSY_RETRY_PCT:-25}  # a FAIL with other% above this ...
BUSY_RETRIES=${BUSY_RETRIES:-2}       # ... is re-run up to this many times
PYTHON=${PYTHON:-python3}
MEDIA_MIN=${MEDIA_MIN:-20000}
MEDIA_MAX=${MEDIA_MAX:-59999}
PROXY_LOG_LEVEL=${PROXY_LOG_LEVEL:-warning}
PYSPY=${PYSPY:-0}
PYSPY_OPTS=${PYSPY_OPTS:-"--rate 200"}
KAM_CFG=${KAM_CFG:-}
KAM_CHILDREN=${KAM_CHILDREN:-4}
KAM_SHM_MB=${KAM_SHM_MB:-1024}  # tm keeps ~10 transactions/call for 5 s: 64 MB runs out at 1000 cps
# TLSF allocator for shm and pkg memory. Debian's default (q_malloc, built with
# DBG_SR_MEMORY) costs ~3x the CPU per call; KAM_OPTS=" " measures the default.
KAM_OPTS=${KAM_OPTS:-"-x tlsf -X tlsf"}
WORK=${WORK:-/tmp/sip_cps/$(date +%Y%m%d-%H%M%S)}
IP=127.0.0.1
SUT_PORT=${SUT_PORT:-15060}             # Kamailio, or the proxy's inside listen port
PROXY_OUT_PORT=${PROXY_OUT_PORT:-15062} # the proxy's outside listen port
UAC_PORT=${UAC_PORT:-15070}
UAS_PORT=${UAS_PORT:-15080}
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

read -r -a sipp_opts <<< "$SIPP_OPTS"
read -r -a uac_opts <<< "$UAC_OPTS"
read -r -a kam_opts <<< "$KAM_OPTS"
read -r -a pyspy_opts <<< "$PYSPY_OPTS"

[ "$PYSPY" = 1 ] && ! command -v py-spy >/dev/null && { echo "PYSPY=1: py-spy is not installed (pip install py-spy)" >&2; exit 2; }
for b in sipp ss awk ps; do
    command -v "$b" >/dev/null || { echo "missing: $b (apt-get install sip-tester iproute2 procps)" >&2; exit 2; }
done
HAVE_KAM=0
command -v kamailio >/dev/null && HAVE_KAM=1
mkdir -p "$WORK"

UAS_PID=""
SUT_PID=""
SPY_PID=""

stop_pid() {            # stop one process we started, by PID
    local p=$1
    [ -n "$p" ] || return 0
    if kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    fi
    wait "$p" 2>/dev/null
    return 0
}
stop_spy() {           # SIGINT: py-spy writes its profile and exits
    [ -n "$SPY_PID" ] || return 0
    kill -INT "$SPY_PID" 2>/dev/null && wait "$SPY_PID" 2>/dev/null
    SPY_PID=""
}
cleanup() { stop_spy; stop_pid "$SUT_PID"; SUT_PID=""; stop_pid "$UAS_PID"; UAS_PID=""; }
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { ss -Hlun "( sport = :$1 )" | grep -q .; }
wait_port() { # wait_port PORT [PID] -> 0 once something listens on udp PORT
    local pid=${2:-}
    for _ in $(seq 150); do
        port_busy "$1" && return 0
        [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && return 1
        sleep 0.1
    done
    return 1
}

# utime+stime (clock ticks) of a PID and all of its direct children
ticks_tree() {
    local root=$1 sum=0 p
    [ -n "$root" ] || { echo 0; return; }
    for p in $root $(ps -o pid= --ppid "$root" 2>/dev/null); do
        [ -r "/proc/$p/stat" ] || continue
        sum=$(( sum + $(awk '{sub(/.*\) /,""); print $12+$13}' "/proc/$p/stat" 2>/dev/null || echo 0) ))
    done
    echo "$sum"
}
# machine-wide busy CPU time in ns. The cgroup counters are exact; /proc/stat is
# tick-sampled and badly under-counts short bursty work in a tickless VM.
sys_ns() {
    if [ -r /sys/fs/cgroup/cpuacct/cpuacct.usage ]; then cat /sys/fs/cgroup/cpuacct/cpuacct.usage
    elif [ -r /sys/fs/cgroup/cpu.stat ]; then awk '/^usage_usec/{print $2 * 1000; exit}' /sys/fs/cgroup/cpu.stat
    else awk -v hz="$HZ" '/^cpu /{printf "%d\n", ($2+$3+$4+$7+$8+$9) * 1e9 / hz; exit}' /proc/stat; fi
}
now() { date +%s.%N; }
# datagrams dropped (receive buffer full) on the uas and middle-box SIP sockets: last
# column of /proc/net/udp for those local ports (fresh sockets every step)
sock_drops() {
    awk -v ports="$(printf '%04X %04X %04X' "$UAS_PORT" "$SUT_PORT" "$PROXY_OUT_PORT")" '
        BEGIN { n = split(ports, p, " "); for (i = 1; i <= n; i++) want[p[i]] = 1 }
        NR > 1 { split($2, a, ":"); if (a[2] in want) d += $NF }
        END { print d + 0 }' /proc/net/udp
}

start_uas() {
    port_busy "$UAS_PORT" && { echo "udp port $UAS_PORT already in use (UAS_PORT=...)" >&2; return 1; }
    sipp -sn uas -i "$IP" -p "$UAS_PORT" -nostdin -trace_err -error_file "$1/uas.errors" \
         "${sipp_opts[@]}" >/dev/null 2>"$1/uas.err" &
    UAS_PID=$!
    wait_port "$UAS_PORT" "$UAS_PID" || { echo "uas did not bind $UAS_PORT" >&2; return 1; }
}

kam_cfg() {   # the minimal stateful proxy (tm, sl, rr, maxfwd, textops) on SUT_PORT
    cat <<EOF
#!KAMAILIO
debug=1
log_stderror=yes
log_facility=LOG_LOCAL0
fork=yes
children=4
listen=udp:$IP:$SUT_PORT
disable_tcp=yes
auto_aliases=no
alias="$IP:$SUT_PORT"
dns=no
rev_dns=no
use_dns_cache=no
dns_try_ipv6=no
maxbuffer=4194304

loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"

modparam("rr", "enable_full_lr", 0)
modparam("rr", "append_fromtag", 0)

request_route {
	if (!mf_process_maxfwd_header("10")) {
		sl_send_reply("483", "Too Many Hops");
		exit;
	}
	if (is_method("CANCEL")) {
		if (t_check_trans()) {
			t_relay_to_udp("$IP", "$UAS_PORT");
		}
		exit;
	}
	if (loose_route()) {
		if (!t_relay()) {
			sl_reply_error();
		}
		exit;
	}
	if (is_method("INVITE")) {
		record_route();
	}
	# initial requests and the built-in uac's ACK/BYE (no Route header): to the uas
	if (!t_relay_to_udp("$IP", "$UAS_PORT")) {
		sl_reply_error();
	}
	exit;
}
EOF
}
kam_mpath() {   # Debian puts the modules under the multiarch dir
    local d
    for d in /usr/lib/*/kamailio/modules /usr/lib/kamailio/modules /usr/local/lib*/kamailio/modules; do
        [ -r "$d/tm.so" ] && { echo "$d/"; return; }
    done
}
start_kam() {
    local cfg=$KAM_CFG mpath
    port_busy "$SUT_PORT" && { echo "udp port $SUT_PORT already in use (SUT_PORT=...)" >&2; return 1; }
    if [ -z "$cfg" ]; then
        cfg=$1/kamailio.cfg
        mpath=$(kam_mpath)
        { kam_cfg | sed -n 1p; [ -n "$mpath" ] && echo "mpath=\"$mpath\""; kam_cfg | sed 1d; } > "$cfg"
    fi
    kamailio -f "$cfg" -n "$KAM_CHILDREN" -m "$KAM_SHM_MB" -M 16 "${kam_opts[@]}" \
             -DD -E -P "$1/kamailio.pid" >"$1/kamailio.log" 2>&1 &
    SUT_PID=$!
    wait_port "$SUT_PORT" "$SUT_PID" || { echo "kamailio did not bind $SUT_PORT (see $1/kamailio.log)" >&2; return 1; }
    sleep 0.5   # let all workers finish forking
}

proxy_toml() {
    cat <<EOF
# generated by bench/sip_cps.sh
[inside]
listen = "$IP:$SUT_PORT"
media_ip = "$IP"
unknown_users = "relay"

[outside]
listen = "$IP:$PROXY_OUT_PORT"
media_ip = "$IP"
upstream = "sip:$IP:$UAS_PORT"

[media]
port_min = $MEDIA_MIN
port_max = $MEDIA_MAX

[sip]
transports = ["udp"]

[log]
level = "$PROXY_LOG_LEVEL"
EOF
}
start_proxy() {
    local p
    for p in "$SUT_PORT" "$PROXY_OUT_PORT"; do
        port_busy "$p" && { echo "udp port $p already in use (SUT_PORT/PROXY_OUT_PORT=...)" >&2; return 1; }
    done
    proxy_toml > "$1/proxy.toml"
    # from the repo root, so `-m proxy` is this checkout; exec: the PID is the proxy's
    (cd "$ROOT" && exec "$PYTHON" -m proxy run --config "$1/proxy.toml") \
        >"$1/proxy.log" 2>&1 &
    SUT_PID=$!
    for p in "$SUT_PORT" "$PROXY_OUT_PORT"; do
        wait_port "$p" "$SUT_PID" || { echo "proxy did not bind $p (see $1/proxy.log):" >&2; tail -n 3 "$1/proxy.log" >&2; return 1; }
    done
}

# Wait (up to QUIET_WAIT s) until the machine is idle: busy < QUIET_MAX % of one core
# over 2 s. Another job on the same cores skews both the ceiling and the CPU figures;
# the "other%" column shows what was left anyway.
wait_quiet() {
    local t=0 a b busy
    while :; do
        a=$(sys_ns); sleep 2; b=$(sys_ns)
        busy=$(( (b - a) / 20000000 ))
        [ "$busy" -lt "$QUIET_MAX" ] && return 0
        t=$(( t + 2 ))
        if [ "$t" -ge "$QUIET_WAIT" ]; then
            echo "# warning: machine still ${busy}% busy after ${QUIET_WAIT}s; measuring anyway" >&2
            return 0
        fi
    done
}

# run_step MODE RATE -> prints one table row (also left in LASTROW), 0 on PASS
LASTROW=""
run_step() {
    local mode=$1 rate=$2 d="$WORK/$1-$2" target m lim rc
    LASTROW=""
    mkdir -p "$d"
    m=$(( rate * DUR ))
    lim=$(( rate > 1000 ? rate : 1000 ))          # -l: max concurrent calls
    wait_quiet
    start_uas "$d" || { cleanup; return 1; }
    case $mode in
        kamailio) start_kam "$d" || { cleanup; return 1; }; target=$IP:$SUT_PORT ;;
        proxy)    start_proxy "$d" || { cleanup; return 1; }; target=$IP:$SUT_PORT ;;
        *)        target=$IP:$UAS_PORT ;;
    esac
    port_busy "$UAC_PORT" && { echo "udp port $UAC_PORT already in use (UAC_PORT=...)" >&2; cleanup; return 1; }

    local u0 k0 s0 t0 t1 u1 k1 s1 q1 plog=0
    if [ "$mode" = proxy ] && [ "$PYSPY" = 1 ]; then
        py-spy record --pid "$SUT_PID" "${pyspy_opts[@]}" --format speedscope \
            -o "$d/proxy.speedscope.json" >"$d/py-spy.log" 2>&1 &
        SPY_PID=$!
        sleep 1   # py-spy attached
    fi
    u0=$(ticks_tree "$UAS_PID"); k0=$(ticks_tree "$SUT_PID"); s0=$(sys_ns); t0=$(now)
    # subshell: `times` reports the CPU of the reaped uac (children line)
    (
        sipp -sn uac "$target" -s "$SERVICE" -i "$IP" -p "$UAC_PORT" -r "$rate" -m "$m" -l "$lim" -d 0 \
             -nostdin -timeout "$UAC_TIMEOUT" -timeout_error \
             -trace_stat -stf "$d/uac.csv" -fd 1 -trace_screen -screen_file "$d/uac.screen" \
             -trace_err -error_file "$d/uac.errors" \
             "${uac_opts[@]}" "${sipp_opts[@]}" >/dev/null 2>"$d/uac.err"
        rc=$?
        times > "$d/uac.times"
        exit $rc
    )
    rc=$?
    t1=$(now); u1=$(ticks_tree "$UAS_PID"); k1=$(ticks_tree "$SUT_PID"); s1=$(sys_ns); q1=$(sock_drops)
    cleanup
    # lines the proxy logged (warnings and errors at the default level)
    [ "$mode" = proxy ] && plog=$(grep -cv '^$' "$d/proxy.log" 2>/dev/null)

    local wall uac_s row unexp
    # Unexpected-Msg column of the final scenario screen (recv lines and pause)
    unexp=$(awk '/Scenario Screen/{n++} n==1 && (/<----------/ || /Pause \[/){s+=$NF} END{print s+0}' "$d/uac.screen" 2>/dev/null)
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
    # second line of `times`: children user/sys as 0m1.234s
    uac_s=$(awk 'NR==2{s=0; for(i=1;i<=2;i++){split($i,a,/[ms]/); s+=a[1]*60+a[2]}; print s}' "$d/uac.times")
    row=$(tail -n 1 "$d/uac.csv" 2>/dev/null)
    LASTROW=$(echo "$row" | awk -F';' -v mode="$mode" -v rate="$rate" -v m="$m" -v rc="$rc" \
        -v wall="$wall" -v unexp="${unexp:-0}" -v drops="$q1" -v plog="${plog:-0}" \
        -v uac="${uac_s:-0}" -v uas="$(( u1 - u0 ))" -v sut="$(( k1 - k0 ))" -v hz="$HZ" \
        -v sysns="$(( s1 - s0 ))" '
    {
        got = ($8 == "") ? 0 : $8 + 0
        out = $12 + 0; ok = $16 + 0; fail = $18 + 0; retr = $58 + 0
        pass = (rc == 0 && fail == 0 && ok == m && got >= 0.95 * rate) ? "PASS" : "FAIL"
        pc = 100.0 / (wall * hz)
        has_sut = (mode != "direct")
        sutcpu = has_sut ? sprintf("%6.1f", sut * pc) : "     -"
        # CPU of the middle box per call (us), over the calls it saw
        percall = (has_sut && out > 0) ? sprintf("%7.0f", sut * 1e6 / hz / out) : "      -"
        sys = sysns / (wall * 1e7)
        mine = uac * 100 / wall + uas * pc + (has_sut ? sut * pc : 0)
        other = sys - mine; if (other < 0) other = 0
        printf "%-8s %6d %8.1f %7d %7d %6d %6d %6d %6d %5d %6.2f %6.1f %6.1f %s %s %6.1f %6.1f  %s (rc=%d)\n",
            mode, rate, got, out, ok, fail, retr, unexp, drops, plog, wall, uac * 100 / wall,
            uas * pc, sutcpu, percall, sys, other, pass, rc
        exit (pass == "PASS") ? 0 : 1
    }')
    local ok=$?
    [ -n "$LASTROW" ] || { LASTROW="$mode $rate (no SIPp statistics: see $d/uac.err)"; ok=1; }
    echo "$LASTROW"
    return $ok
}

header() {
    printf "%-8s %6s %8s %7s %7s %6s %6s %6s %6s %5s %6s %6s %6s %6s %7s %6s %6s  %s\n" \
        mode target achieved calls ok failed retr unexp drops plog wall_s uac% uas% sut% us/call \
        sys% other% verdict
}

machine() {
    local model
    model=$(awk -F': *' '/^model name/{print $2; exit}' /proc/cpuinfo)
    printf "%s, %s cpus (%s), Linux %s" "${model:-unknown CPU}" "$NCPU" \
        "$(lscpu 2>/dev/null | awk -F': *' '/^Thread\(s\) per core/{t=$2} /^Core\(s\) per socket/{c=$2} /^Socket\(s\)/{s=$2} END{if (c) printf "%d cores x %d threads", c*s, t; else printf "?"}')" \
        "$(uname -r)"
}

MACHINE=$(machine)
PYINFO=$(cd "$ROOT" && "$PYTHON" -c 'import sys
try:
    import uvloop; loop = "uvloop " + uvloop.__version__
except ImportError:
    loop = "NO uvloop (stdlib asyncio loop)"
print("Python %d.%d.%d, %s" % (sys.version_info[:3] + (loop,)))' 2>/dev/null || echo "no $PYTHON")
KAMVER="not installed"
[ "$HAVE_KAM" = 1 ] && KAMVER=$(kamailio -v 2>/dev/null | awk 'NR==1{print $2, $3}')
CODE=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)
if [ -n "$CODE" ]; then
    dirty=$(cd "$ROOT" && git status --porcelain -- proxy 2>/dev/null | wc -l)
    [ "$dirty" -gt 0 ] && CODE+=" + $dirty uncommitted file(s) in proxy/"
fi
echo "# machine: $MACHINE"
echo "# code: ${CODE:-unknown (not a git checkout)}"
echo "# SIPp $(sipp -v 2>/dev/null | awk '/SIPp v/{print $2}'); sipura-proxy: $PYINFO; $KAMVER"
echo "# DUR=${DUR}s, -d 0, uac -s $SERVICE; SIPP_OPTS='$SIPP_OPTS' UAC_OPTS='$UAC_OPTS'"
echo "# proxy: [media] $MEDIA_MIN-$MEDIA_MAX, [log] level $PROXY_LOG_LEVEL, udp$([ "$PYSPY" = 1 ] && echo "; PROFILED by py-spy $PYSPY_OPTS")"
[ "$HAVE_KAM" = 1 ] && echo "# kamailio -n $KAM_CHILDREN -m $KAM_SHM_MB $KAM_OPTS"
echo "# logs: $WORK"
echo "# retr/unexp: SIPp uac retransmissions / unexpected msgs; drops: datagrams dropped on the"
echo "#   uas/middle-box SIP sockets (/proc/net/udp); plog: lines in the proxy's log"
echo "# CPU%: per process, 100 = one core; sut% = the middle box (sipura-proxy, or all of"
echo "#   Kamailio's processes); us/call = its CPU per call; sys% = whole machine, max $(( NCPU * 100 ));"
echo "#   other% = sys% - (uac+uas+sut): kernel softirq + anything else running (should be small)"
header
declare -A CEIL CEILROW
for mode in $MODES; do
    CEIL[$mode]=0; CEILROW[$mode]=""
    case $mode in
        direct)   rates=$DIRECT_RATES ;;
        proxy)    rates=$PROXY_RATES ;;
        kamailio) rates=$KAM_RATES
                  if [ "$HAVE_KAM" != 1 ]; then
                      echo "# kamailio: not installed, mode skipped (apt-get install -y kamailio)"
                      CEIL[$mode]=skipped; continue
                  fi ;;
        *) echo "unknown mode: $mode (direct, proxy, kamailio)" >&2; exit 2 ;;
    esac
    stop=0
    for r in $rates; do
        tries=0
        while :; do
            if run_step "$mode" "$r"; then
                CEIL[$mode]=$r; CEILROW[$mode]=$LASTROW; break
            fi
            # other% (field 17): a failure while something else ate the CPU is retried
            other=$(echo "$LASTROW" | awk 'NF >= 17 {printf "%d", $17}')
            if [ "${other:-0}" -gt "$BUSY_RETRY_PCT" ] && [ "$tries" -lt "$BUSY_RETRIES" ]; then
                tries=$(( tries + 1 ))
                echo "# ^ other load ${other}% > ${BUSY_RETRY_PCT}%: retry $tries/$BUSY_RETRIES"
                continue
            fi
            [ "$STOP_ON_FAIL" = 1 ] && stop=1
            break
        done
        [ "$stop" = 1 ] && break
    done
done
echo "# ceiling rows (CPU at the highest passing rate):"
for mode in $MODES; do [ -n "${CEILROW[$mode]:-}" ] && echo "${CEILROW[$mode]}"; done
line="RESULT"
for mode in direct proxy kamailio; do
    case " $MODES " in *" $mode "*) ;; *) continue ;; esac
    # uac% uas% sut% us/call are fields 12-15 of the row
    cpu=$(echo "${CEILROW[$mode]:-}" | awk -v mode="$mode" 'NF >= 15 {
        printf "uac %s%% uas %s%%", $12, $13
        if ($14 != "-") printf " %s %s%% = %s us/call", (mode == "proxy" ? "proxy" : "kam"), $14, $15 }')
    line+=" ${mode}_cps=${CEIL[$mode]}${cpu:+ ($cpu)}"
done
echo "$line; 0 failed calls, >=95% of target rate, DUR=${DUR}s; $MACHINE; 127.0.0.1"
