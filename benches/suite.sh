#!/usr/bin/env bash
# Benchmark suite (issue #6): unpart against nginx and the direct path, in one run. Measures;
# not a test.
#
#   bash benches/suite.sh
#   SIZE_MB=64 CONC=8 CONC_MB=16 DURATION=3 REPS=1 bash benches/suite.sh     # a quick run
#
# One counting upstream (examples/count_upstream.rs) behind four paths, all in the same run:
#   direct   the client talks to the upstream itself
#   nginx    Debian's nginx as a plain streaming proxy: worker_processes 2,
#            proxy_request_buffering off, client_body_buffer_size 1m, client_max_body_size 0,
#            HTTP/1.1 keep-alive upstream, access_log off (it forwards the multipart body as is)
#   stream   unpart (release, threads: 2), stream mode: the upstream gets the file bytes only
#   spool    the same unpart, a spool route (/spool/, digests SPOOL_DIGESTS)
# and three measurements:
#   a. one SIZE_MB upload (default 1024 MiB), REPS times per path,
#   b. CONC concurrent CONC_MB uploads (default 64 x 256 MiB), REPS times per path,
#      both with examples/upload_client.rs (Content-Length framing, one field then the file):
#      MB/s (multipart body bytes / 10^6 / wall seconds, median of REPS), the proxy's CPU
#      seconds (user+sys) per GiB of body (median), its peak RSS (highest of REPS);
#   c. small forms (a 10 KiB file after 5 fields, Content-Length, keep-alive) with wrk for
#      DURATION seconds (default 10) at each concurrency in SMALL_CONC (default "1 16 64"):
#      requests/s, p50 and p99 latency, the proxy's CPU microseconds per request and peak RSS;
#   d. HTTP/2 (issue #5): curl -F of a SIZE_MB file over HTTP/1.1 and over h2c (prior
#      knowledge), through nginx (a second listener with `http2`, http2_body_preread_size 4m
#      to match unpart's 4 MiB stream window) and unpart stream, REPS times each: MB/s, the
#      h2/h1 ratio of each proxy (issue #5's target: unpart >= 0.8x; nginx's is the reference
#      for what this client and machine allow), and the CPU seconds per GiB of the proxy and
#      of curl. H2=0 leaves it out.
# Every run's answer is checked: upload_client compares the upstream's byte count with the
# body (direct, nginx) or the file (stream, spool); wrk runs with a non-2xx answer or a
# socket error are fatal. Within each repetition the paths take turns, the first rotating.
#
# Accounting: CPU is utime+stime from /proc/PID/stat before and after each run, all threads;
# for nginx the master and both workers summed. Peak RSS is VmHWM, reset before each run
# through /proc/PID/clear_refs; for nginx the workers' VmHWM summed (the master only forks and
# waits; its RSS is printed apart). Direct has no proxy, so no CPU or RSS.
#
# It prints the tables and writes them as Markdown to OUT (default benches/results.md), with
# the ratios unpart/nginx and unpart/direct and each target of issue #6 (quiet 2-core machine):
# stream >= 1.0x nginx's MB/s and <= 0.5 CPU-s per GiB, unpart peak RSS <= 32 MiB with CONC
# concurrent uploads, stream small-form req/s >= nginx's.
#
# Environment: SIZE_MB, CONC, CONC_MB, REPS (default 3), DURATION, SMALL_CONC, SMALL_REPS
# (default 1; median), H2 (default 1), WRK_THREADS (default 2, at most the connections), SPOOL=0 to leave the
# spool path out, SPOOL_DIGESTS (comma-separated, or none; default sha256), ACCESS_LOG=1 for
# nginx's and unpart's access logs (default: both off), OUT, REQ_TIMEOUT
# (seconds per upload_client run, default 600), LIFETIME (seconds the servers may live,
# default 7200), BUILD=0 to skip the build, REL=DIR for binaries built elsewhere.
# nginx and wrk are installed with apt-get when missing (on a systemd host Debian's package
# also starts its own nginx.service on port 80: idle, not used, left alone). The spool path needs free space in
# ${TMPDIR:-/tmp} for all concurrent files (CONC x CONC_MB); without it that phase skips spool.
# Everything binds 127.0.0.1; every wait is bounded; a trap stops everything the script
# started (by PID) and removes its temp directory on exit, error or Ctrl-C.

set -euo pipefail

SIZE_MB=${SIZE_MB:-1024}
CONC=${CONC:-64}
CONC_MB=${CONC_MB:-256}
REPS=${REPS:-3}
DURATION=${DURATION:-10}
SMALL_CONC=${SMALL_CONC:-1 16 64}
SMALL_REPS=${SMALL_REPS:-1}
WRK_THREADS=${WRK_THREADS:-2}
SPOOL=${SPOOL:-1}
H2=${H2:-1}
SPOOL_DIGESTS=${SPOOL_DIGESTS:-sha256}
ACCESS_LOG=${ACCESS_LOG:-0}
REQ_TIMEOUT=${REQ_TIMEOUT:-600}
LIFETIME=${LIFETIME:-7200}
BUILD=${BUILD:-1}
# OUT is relative to the caller's directory; the default lives in benches/.
if [ -n "${OUT:-}" ] && [[ $OUT != /* ]]; then OUT=$PWD/$OUT; fi

TARGET_NGINX_X=1.0
TARGET_CPU_GIB=0.5
TARGET_RSS_MIB=32

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init suite.sh
OUT=${OUT:-$ROOT/benches/results.md}

need_posint SIZE_MB CONC CONC_MB REPS DURATION SMALL_REPS WRK_THREADS REQ_TIMEOUT LIFETIME
for c in $SMALL_CONC; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || { echo "$ME: SMALL_CONC must list positive integers, not '$SMALL_CONC'" >&2; exit 2; }
done
[ -n "${SMALL_CONC// /}" ] || { echo "$ME: SMALL_CONC is empty" >&2; exit 2; }
[[ $BUILD =~ ^[01]$ ]] || { echo "$ME: BUILD must be 0 or 1" >&2; exit 2; }
[[ $SPOOL =~ ^[01]$ ]] || { echo "$ME: SPOOL must be 0 or 1" >&2; exit 2; }
[[ $H2 =~ ^[01]$ ]] || { echo "$ME: H2 must be 0 or 1" >&2; exit 2; }
[[ $ACCESS_LOG =~ ^[01]$ ]] || { echo "$ME: ACCESS_LOG must be 0 or 1" >&2; exit 2; }
# nginx runs with access_log off as issue #6 says, so unpart's access log (a line per request
# on stderr) is off too; ACCESS_LOG=1 turns both on, each writing to a file in $TMP.
if [ "$ACCESS_LOG" = 1 ]; then
    UNPART_LOG=info
    NGINX_ACCESS_LOG="access_log $TMP/nginx-access.log;"
else
    UNPART_LOG=info,access=off
    NGINX_ACCESS_LOG="access_log off;"
fi
DIG='(md5|sha1|sha256|sha512|crc32c)'
if [ "$SPOOL_DIGESTS" = none ]; then
    DIGESTS_YAML="[]"
elif [[ $SPOOL_DIGESTS =~ ^$DIG(,$DIG)*$ ]]; then
    DIGESTS_YAML="[${SPOOL_DIGESTS//,/, }]"
else
    echo "$ME: SPOOL_DIGESTS must be 'none' or a comma-separated list of md5, sha1, sha256, sha512, crc32c" >&2
    exit 2
fi
if ! [ -d "$(dirname "$OUT")" ] || ! [ -w "$(dirname "$OUT")" ]; then die "cannot write $OUT"; fi

TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Tools.

# ensure_tool COMMAND PACKAGE: installs Debian's PACKAGE quietly when COMMAND is missing.
ensure_tool() {
    if command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; then return 0; fi
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing and there is no apt-get: install $2"
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "$1 is missing: install $2 (apt-get needs root)"
        sudo=(sudo -n)
    fi
    echo "installing Debian's $2 (apt-get install $2) ..."
    if ! timeout 900 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" \
        >"$TMP/apt.log" 2>&1; then
        timeout 900 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
            >>"$TMP/apt.log" 2>&1 || die "apt-get update failed"
        timeout 900 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" \
            >>"$TMP/apt.log" 2>&1 || die "apt-get install $2 failed"
    fi
}

build_release --bin unpart --example count_upstream --example upload_client
ensure_tool nginx nginx
ensure_tool wrk wrk
NGINX=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
WRK=$(command -v wrk)

# ---------------------------------------------------------------------------------------------
# Servers.

start_upstream
start_unpart "h2c: true
routes:
  - prefix: /spool/
    mode: spool
spool:
  dir: $TMP/spool
  max_total_bytes: 0
  digests: $DIGESTS_YAML"

NGINX_PID=""
NGINX_WORKERS=()
# The workers outlive a KILLed master: stop any still running, if they are still nginx's.
bench_cleanup_hook() {
    local w live=()
    for w in "${NGINX_WORKERS[@]}"; do
        if tr '\0' ' ' 2>/dev/null <"/proc/$w/cmdline" | grep -q '^nginx: worker'; then
            live+=("$w")
        fi
    done
    if [ "${#live[@]}" -gt 0 ]; then stop "${live[@]}"; fi
}

# Starts nginx as a non-daemon child with its own prefix, config and logs in $TMP, on a picked
# port (a lost race to bind shows as an early exit: try again), and its HTTP/2 (h2c) listener on
# another. Sets NGINX_ADDR, NGINX_H2_ADDR, NGINX_PID and
# NGINX_WORKERS.
start_nginx() {
    local _ tpid d ws user=""
    mkdir -p "$TMP/nginx"
    # As root nginx runs its workers as nobody, who cannot enter the private $TMP.
    [ "$(id -u)" = 0 ] && user="user root;"
    for _ in 1 2 3 4 5; do
        NGINX_ADDR="127.0.0.1:$(pick_port)" || die "no free port"
        NGINX_H2_ADDR="127.0.0.1:$(pick_port)" || die "no free port"
        [ "$NGINX_ADDR" != "$NGINX_H2_ADDR" ] || continue
        cat >"$TMP/nginx/nginx.conf" <<EOF
# A plain streaming reverse proxy, as issue #6 specifies it.
$user
worker_processes 2;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx-error.log warn;
events {
    worker_connections 4096;
}
http {
    $NGINX_ACCESS_LOG
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    # The default 1000 requests per connection would make wrk reconnect during the small-form
    # runs, a cost unpart does not impose.
    keepalive_requests 1000000;
    upstream counting {
        server $UPSTREAM;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen $NGINX_ADDR;
        listen $NGINX_H2_ADDR http2;
        http2_body_preread_size 4m;
        client_max_body_size 0;
        client_body_buffer_size 1m;
        location / {
            proxy_pass http://counting;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }
    }
}
EOF
        timeout -k 10 -s TERM "$LIFETIME" "$NGINX" -p "$TMP/nginx/" -e "$TMP/nginx-error.log" \
            -c "$TMP/nginx/nginx.conf" -g 'daemon off;' >"$TMP/nginx-out.log" 2>&1 &
        tpid=$!
        PIDS+=("$tpid")
        NGINX_PID=$(child_of "$tpid") || NGINX_PID=""
        [ -n "$NGINX_PID" ] && CHILDREN+=("$NGINX_PID")
        d=$(deadline 10)
        while [ -n "$NGINX_PID" ] && before "$d" && kill -0 "$NGINX_PID" 2>/dev/null; do
            mapfile -t ws < <(children_of "$NGINX_PID")
            if [ "${#ws[@]}" = 2 ] && port_in_use "${NGINX_ADDR#*:}" && port_in_use "${NGINX_H2_ADDR#*:}"; then
                NGINX_WORKERS=("${ws[@]}")
                return 0
            fi
            sleep 0.05
        done
        stop ${NGINX_PID:+"$NGINX_PID"} "$tpid"
        unset 'PIDS[${#PIDS[@]}-1]'
        [ -n "$NGINX_PID" ] && unset 'CHILDREN[${#CHILDREN[@]}-1]'
        NGINX_PID=""
    done
    die "nginx did not start"
}
start_nginx

# ---------------------------------------------------------------------------------------------
# Paths and accounting.

PATHS=(direct nginx stream)
[ "$SPOOL" = 1 ] && PATHS+=(spool)

addr_of() {
    case $1 in
        direct) echo "$UPSTREAM" ;;
        nginx) echo "$NGINX_ADDR" ;;
        *) echo "$LISTEN" ;;
    esac
}
# URL path of the large uploads and of the small forms.
upath_of() { if [ "$1" = spool ]; then echo /spool/upload; else echo /upload; fi; }
fpath_of() { if [ "$1" = spool ]; then echo /spool/form; else echo /form; fi; }
# What the upstream receives: the multipart body itself, or the file only.
expect_of() { case $1 in direct | nginx) echo body ;; *) echo file ;; esac; }
# The processes whose CPU counts, and those whose peak RSS counts.
cpu_pids() { case $1 in direct) ;; nginx) echo "$NGINX_PID ${NGINX_WORKERS[*]}" ;; *) echo "$UNPART_PID" ;; esac; }
mem_pids() { case $1 in direct) ;; nginx) echo "${NGINX_WORKERS[*]}" ;; *) echo "$UNPART_PID" ;; esac; }

# The proxies must still be the processes we measure (nginx would replace a crashed worker).
check_alive() {
    local p
    kill -0 "$UNPART_PID" 2>/dev/null || die "unpart exited"
    for p in "$NGINX_PID" "${NGINX_WORKERS[@]}"; do
        kill -0 "$p" 2>/dev/null || die "nginx process $p exited"
    done
}

# Clock ticks (user+system) of the given processes together.
ticks() {
    local p t=0
    for p in "$@"; do
        t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')))
    done
    echo "$t"
}
HWM_RESET=1
reset_hwm() {
    local p
    for p in "$@"; do
        echo 5 >"/proc/$p/clear_refs" 2>/dev/null || HWM_RESET=0
    done
}
hwm_kib() {
    local p t=0
    for p in "$@"; do t=$((t + $(kib_of "$p" VmHWM))); done
    echo "$t"
}
# Waits for a quiet machine (at most 30 s), then, for unpart's paths, (at most 20 s) until unpart
# is idle again after the previous run: no more threads than after the warm-up (tokio's
# blocking-pool threads idle 10 s before they exit) and its RSS no longer falling (jemalloc
# returns freed pages within a second). So a path's peak RSS is its own, not what the run before
# it (a spool run, say) left behind.
settle() {
    quiet 30
    case $1 in stream | spool) ;; *) return 0 ;; esac
    local d t r0 r1
    d=$(deadline 20)
    while before "$d"; do
        t=$(status_of "$UNPART_PID" Threads)
        r0=$(kib_of "$UNPART_PID" VmRSS)
        sleep 0.5
        r1=$(kib_of "$UNPART_PID" VmRSS)
        if [ "$t" -le "$UNPART_THREADS" ] && [ "$r1" -ge "$r0" ]; then return 0; fi
    done
    echo "  note: unpart not idle after 20 s ($t threads, $UNPART_THREADS when idle; RSS $(mib "$r1") MiB)"
}
# Rotates PATHS by $1 places, so no path always runs right after the same one.
rotated() {
    local n=${#PATHS[@]} i
    for i in $(seq 0 $((n - 1))); do echo "${PATHS[$(((i + $1) % n))]}"; done
}

declare -A R=()   # "measurement/path/metric" -> space-separated values of every repetition
add() { R[$1]="${R[$1]:-}${R[$1]:+ }$2"; }
get() { echo "${R[$1]:-}"; }
fmt() { awk -v v="$2" -v f="$1" 'BEGIN { printf f, v }'; }

# Disk room for spool files: MiB free under $TMP, minus a margin.
spool_fits() {
    local free_mib
    free_mib=$(df -Pk "$TMP" | awk 'NR == 2 { printf "%d", $4 / 1024 }')
    [ "$1" -le $((free_mib - 1024)) ]
}

echo "== unpart benchmark suite: unpart against nginx and the direct path (issue #6)"
print_env
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "binaries: $REL (unpart built $(date -u -r "$REL/unpart" '+%Y-%m-%d %H:%M UTC'))"
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')
WRK_VERSION=$({ "$WRK" -v 2>&1 || true; } | head -n 1 | awk '{ print $1, $2 }')
echo "servers:  upstream $UPSTREAM (pid $UPSTREAM_PID), nginx $NGINX_ADDR and h2c $NGINX_H2_ADDR ($NGINX_VERSION, master $NGINX_PID, workers ${NGINX_WORKERS[*]}), unpart $LISTEN (pid $UNPART_PID, threads: 2)"
KNOBS="SIZE_MB=$SIZE_MB CONC=$CONC CONC_MB=$CONC_MB REPS=$REPS DURATION=$DURATION SMALL_CONC='$SMALL_CONC' SMALL_REPS=$SMALL_REPS H2=$H2 WRK_THREADS=$WRK_THREADS SPOOL=$SPOOL SPOOL_DIGESTS=$SPOOL_DIGESTS ACCESS_LOG=$ACCESS_LOG"
echo "paths:    ${PATHS[*]}"
echo "knobs:    $KNOBS"
awk -v l="${LOAD0%% *}" 'BEGIN { exit !(l > 0.5) }' &&
    echo "WARNING:  load average ${LOAD0%% *}: the machine is not quiet, figures will be noisy"
[ "$(nproc)" = 2 ] || echo "NOTE:     the targets are for a 2-core machine; this one has $(nproc)"

# ---------------------------------------------------------------------------------------------
# a, b. Large uploads.

# large LABEL SIZE_MB CONC [skip-spool]: REPS rounds, each path once per round.
large() {
    local label=$1 size=$2 conc=$3 skip=${4:-} i p name out t0 t1 bytes cpu mp cp
    for i in $(seq 1 "$REPS"); do
        while read -r p; do
            [ "$p" = spool ] && [ -n "$skip" ] && continue
            name="${label}_${p}_$i"
            read -r -a cp <<<"$(cpu_pids "$p")"
            read -r -a mp <<<"$(mem_pids "$p")"
            settle "$p"
            reset_hwm "${mp[@]}"
            t0=$(ticks "${cp[@]}")
            run_client "$name" "$(addr_of "$p")" "$size" "$conc" "$(expect_of "$p")" --path "$(upath_of "$p")"
            t1=$(ticks "${cp[@]}")
            out="$TMP/$name.out"
            bytes=$(field "$out" body_bytes)
            add "$label/$p/mbs" "$(field "$out" mb_s)"
            if [ "$p" != direct ]; then
                cpu=$(awk -v t=$((t1 - t0)) -v k="$TCK" -v b="$bytes" 'BEGIN { printf "%.3f", t / k / (b / 1073741824) }')
                add "$label/$p/cpu" "$cpu"
                add "$label/$p/hwm" "$(hwm_kib "${mp[@]}")"
                printf '  run %d %-7s %8.1f MB/s  %6.3f CPU-s/GiB  peak RSS %6.1f MiB\n' "$i" "$p" \
                    "$(field "$out" mb_s)" "$cpu" "$(mib "$(hwm_kib "${mp[@]}")")"
            else
                printf '  run %d %-7s %8.1f MB/s\n' "$i" "$p" "$(field "$out" mb_s)"
            fi
            check_alive
        done < <(rotated $((i - 1)))
    done
}

# Warm-up, and a check that every path answers as expected.
for p in "${PATHS[@]}"; do
    run_client "warm_$p" "$(addr_of "$p")" 8 1 "$(expect_of "$p")" --path "$(upath_of "$p")"
done
echo "warm-up:  8 MiB on every path OK"
# unpart's idle thread count, its spool file threads included (they start with the first spool
# job and stay), once any blocking-pool thread of the warm-up has had its 10 s to exit: what
# settle waits for.
sleep 11
UNPART_THREADS=$(status_of "$UNPART_PID" Threads)

echo
echo "== a. 1 upload of $SIZE_MB MiB, $REPS run(s) per path"
SINGLE_SKIP=""
if [ "$SPOOL" = 1 ] && ! spool_fits "$SIZE_MB"; then
    SINGLE_SKIP=1
    echo "  spool skipped: less than $SIZE_MB MiB + 1 GiB free under $TMP"
fi
large single "$SIZE_MB" 1 ${SINGLE_SKIP:+"$SINGLE_SKIP"}

echo
echo "== b. $CONC concurrent uploads of $CONC_MB MiB each, $REPS run(s) per path (aggregate MB/s)"
CONC_SKIP=""
if [ "$SPOOL" = 1 ] && ! spool_fits $((CONC * CONC_MB)); then
    CONC_SKIP=1
    echo "  spool skipped: less than $((CONC * CONC_MB)) MiB + 1 GiB free under $TMP"
fi
large conc "$CONC_MB" "$CONC" ${CONC_SKIP:+"$CONC_SKIP"}

# ---------------------------------------------------------------------------------------------
# c. Small forms.

BOUNDARY=----unpartSuiteFormQ7v2LkZx
FILE_BYTES=10240
{
    for i in 1 2 3 4 5; do
        printf -- '--%s\r\nContent-Disposition: form-data; name="field%d"\r\n\r\n%s\r\n' \
            "$BOUNDARY" "$i" "value number $i of the small form"
    done
    printf -- '--%s\r\nContent-Disposition: form-data; name="file"; filename="small.bin"\r\nContent-Type: application/octet-stream\r\n\r\n' "$BOUNDARY"
    # No CR in the file, so the delimiter cannot occur in it.
    head -c "$FILE_BYTES" /dev/urandom | tr '\r' 'R'
    printf -- '\r\n--%s--\r\n' "$BOUNDARY"
} >"$TMP/form.body"
FORM_BYTES=$(stat -c %s "$TMP/form.body")
cat >"$TMP/form.lua" <<'EOF'
-- POSTs the prebuilt multipart body in $FORM_BODY; prints one line of results when done.
local f = assert(io.open(os.getenv("FORM_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. os.getenv("FORM_BOUNDARY")

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "wrk_result requests=%d duration_us=%d p50_us=%.0f p99_us=%.0f socket_errors=%d status_errors=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.connect + e.read + e.write + e.timeout, e.status))
end
EOF

# run_wrk NAME PATH CONC SECONDS: one wrk run, its result line in $TMP/NAME.out.
run_wrk() {
    local name=$1 p=$2 c=$3 secs=$4 t=$WRK_THREADS
    [ "$t" -le "$c" ] || t=$c
    FORM_BODY="$TMP/form.body" FORM_BOUNDARY="$BOUNDARY" timeout -s TERM $((secs + 60)) \
        "$WRK" -t "$t" -c "$c" -d "${secs}s" --timeout 10s -s "$TMP/form.lua" \
        "http://$(addr_of "$p")$(fpath_of "$p")" >"$TMP/$name.wrk" 2>"$TMP/$name.log" &
    CLIENT_PID=$!
    if ! wait "$CLIENT_PID"; then
        CLIENT_PID=""
        die "wrk run '$name' failed: $(cat "$TMP/$name.log" "$TMP/$name.wrk")"
    fi
    CLIENT_PID=""
    grep '^wrk_result ' "$TMP/$name.wrk" | sed 's/^wrk_result //' >"$TMP/$name.out" ||
        die "wrk run '$name' printed no result: $(cat "$TMP/$name.wrk")"
    [ "$(field "$TMP/$name.out" status_errors)" = 0 ] ||
        die "wrk run '$name' got non-2xx answers: $(cat "$TMP/$name.wrk")"
    [ "$(field "$TMP/$name.out" socket_errors)" = 0 ] ||
        die "wrk run '$name' had socket errors: $(cat "$TMP/$name.wrk")"
    [ "$(field "$TMP/$name.out" requests)" -gt 0 ] || die "wrk run '$name' completed no request"
}

# One form per path through curl, with the upstream's byte count checked, then 1 s of wrk.
for p in "${PATHS[@]}"; do
    want=$FORM_BYTES
    [ "$(expect_of "$p")" = file ] && want=$FILE_BYTES
    got=$(curl -sS --max-time 10 -H 'Expect:' -H "Content-Type: multipart/form-data; boundary=$BOUNDARY" \
        --data-binary "@$TMP/form.body" "http://$(addr_of "$p")$(fpath_of "$p")") ||
        die "small form on path $p failed"
    [ "$got" = "{\"bytes\":$want}" ] || die "small form on path $p: upstream answered $got, expected $want bytes"
    run_wrk "warm_small_$p" "$p" "$(echo "$SMALL_CONC" | tr ' ' '\n' | sort -n | tail -n 1)" 1
done

echo
echo "== c. small forms ($FORM_BYTES-byte body: 5 fields, then a $FILE_BYTES-byte file), wrk ${DURATION} s per run, $SMALL_REPS run(s) per path and concurrency"
for i in $(seq 1 "$SMALL_REPS"); do
    for c in $SMALL_CONC; do
        while read -r p; do
            name="small_${c}_${p}_$i"
            read -r -a cp <<<"$(cpu_pids "$p")"
            read -r -a mp <<<"$(mem_pids "$p")"
            settle "$p"
            reset_hwm "${mp[@]}"
            t0=$(ticks "${cp[@]}")
            run_wrk "$name" "$p" "$c" "$DURATION"
            t1=$(ticks "${cp[@]}")
            out="$TMP/$name.out"
            n=$(field "$out" requests)
            rps=$(awk -v n="$n" -v d="$(field "$out" duration_us)" 'BEGIN { printf "%.1f", n / (d / 1e6) }')
            add "small$c/$p/rps" "$rps"
            add "small$c/$p/p50" "$(field "$out" p50_us)"
            add "small$c/$p/p99" "$(field "$out" p99_us)"
            line=$(printf '  c=%-3s %-7s %9.0f req/s  p50 %7.2f ms  p99 %7.2f ms' "$c" "$p" "$rps" \
                "$(awk -v u="$(field "$out" p50_us)" 'BEGIN { print u / 1000 }')" \
                "$(awk -v u="$(field "$out" p99_us)" 'BEGIN { print u / 1000 }')")
            if [ "$p" != direct ]; then
                cpu=$(awk -v t=$((t1 - t0)) -v k="$TCK" -v n="$n" 'BEGIN { printf "%.1f", t / k * 1e6 / n }')
                add "small$c/$p/cpu" "$cpu"
                add "small$c/$p/hwm" "$(hwm_kib "${mp[@]}")"
                line+=$(printf '  %6.1f CPU-us/req  peak RSS %6.1f MiB' "$cpu" "$(mib "$(hwm_kib "${mp[@]}")")")
            fi
            echo "$line"
            check_alive
        done < <(rotated $((i - 1)))
    done
done

# ---------------------------------------------------------------------------------------------
# d. HTTP/2 against HTTP/1.1: the same client (curl), the same file, through both proxies.

H2_WAYS=("nginx h1" "nginx h2" "stream h1" "stream h2")
if [ "$H2" = 1 ]; then
    echo
    echo "== d. HTTP/2 (h2c) and HTTP/1.1: curl -F of a $SIZE_MB MiB file through nginx and unpart stream, $REPS run(s) each"
    fill_file "$TMP/h2.bin" "$SIZE_MB"
    # On disk before the runs: otherwise the quiet wait below waits on its writeback.
    timeout 300 sync "$TMP/h2.bin" || echo "  note: sync of the test file failed or took over 300 s"
    for i in $(seq 1 "$REPS"); do
        for k in 0 1 2 3; do
            read -r p v <<<"${H2_WAYS[$(((k + i - 1) % 4))]}"
            if [ "$p" = nginx ] && [ "$v" = h2 ]; then addr=$NGINX_H2_ADDR; else addr=$(addr_of "$p"); fi
            if [ "$v" = h2 ]; then flag=--http2-prior-knowledge; else flag=--http1.1; fi
            read -r -a cp <<<"$(cpu_pids "$p")"
            quiet 30
            t0=$(ticks "${cp[@]}")
            out=$(curl_upload "$flag" "http://$addr$(upath_of "$p")" "$TMP/h2.bin")
            t1=$(ticks "${cp[@]}")
            read -r code up secs ver csecs <<<"$out"
            [ "$code" = 200 ] || die "curl $flag through $p got $code"
            [ "$ver" = "${v#h}" ] || [ "$ver/$v" = "1.1/h1" ] || die "curl $flag through $p spoke HTTP/$ver"
            # The upstream counts the multipart body (nginx) or the file alone (unpart).
            if [ "$p" = nginx ]; then want=$up; else want=$((SIZE_MB * 1048576)); fi
            [ "$(cat "$TMP/curl.resp")" = "{\"bytes\":$want}" ] ||
                die "curl $flag through $p: upstream answered $(cat "$TMP/curl.resp"), expected $want bytes"
            mbs=$(awk -v b="$up" -v t="$secs" 'BEGIN { printf "%.1f", b / 1e6 / t }')
            gib=$(awk -v b="$up" 'BEGIN { printf "%.6f", b / 1073741824 }')
            cpu=$(awk -v t=$((t1 - t0)) -v k="$TCK" -v g="$gib" 'BEGIN { printf "%.3f", t / k / g }')
            ccpu=$(awk -v c="$csecs" -v g="$gib" 'BEGIN { printf "%.3f", c / g }')
            add "h2/$p/$v/mbs" "$mbs"
            add "h2/$p/$v/cpu" "$cpu"
            add "h2/$p/$v/ccpu" "$ccpu"
            printf '  run %d %-6s %s %8.1f MB/s  proxy %6.3f CPU-s/GiB  curl %6.3f CPU-s/GiB\n' \
                "$i" "$p" "$v" "$mbs" "$cpu" "$ccpu"
            check_alive
        done
    done
    rm -f "$TMP/h2.bin" "$TMP/curl.resp" "$TMP/curl.time"
fi
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
NGINX_MASTER_RSS=$(mib "$(kib_of "$NGINX_PID" VmRSS)")

# ---------------------------------------------------------------------------------------------
# Tables: tab-separated rows, the first the header; printed aligned and written as Markdown.

na() { if [ -z "$1" ]; then echo "-"; else fmt "$2" "$1"; fi; }
# x RATIO-OF a b: a / b as "0.95x", or "-" when either is missing.
x() { if [ -z "$1" ] || [ -z "$2" ]; then echo "-"; else awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; fi; }
med() { local v; if [ -z "$1" ]; then echo ""; else read -r -a v <<<"$1"; median "${v[@]}"; fi; }
top() { local v; if [ -z "$1" ]; then echo ""; else read -r -a v <<<"$1"; highest "${v[@]}"; fi; }

row() { local IFS=$'\t'; echo "$*"; }

{
    row upload path "MB/s" "x nginx" "x direct" "proxy CPU-s/GiB" "proxy peak RSS MiB" "MB/s of each run"
    for label in single conc; do
        if [ "$label" = single ]; then what="1 x $SIZE_MB MiB"; else what="$CONC x $CONC_MB MiB"; fi
        dm=$(med "$(get "$label/direct/mbs")")
        nm=$(med "$(get "$label/nginx/mbs")")
        for p in "${PATHS[@]}"; do
            vals=$(get "$label/$p/mbs")
            if [ -z "$vals" ]; then row "$what" "$p" "skipped" - - - - -; continue; fi
            m=$(med "$vals")
            xn=$(x "$m" "$nm"); xd=$(x "$m" "$dm")
            [ "$p" = nginx ] && xn=-
            [ "$p" = direct ] && xn=- && xd=-
            hw=$(top "$(get "$label/$p/hwm")")
            row "$what" "$p" "$(fmt %.0f "$m")" "$xn" "$xd" "$(na "$(med "$(get "$label/$p/cpu")")" %.2f)" \
                "$(if [ -n "$hw" ]; then mib "$hw"; else echo -; fi)" "$vals"
        done
    done
} >"$TMP/large.tsv"

{
    row concurrency path "req/s" "x nginx" "x direct" "p50 ms" "p99 ms" "proxy CPU-us/req" "proxy peak RSS MiB"
    for c in $SMALL_CONC; do
        dm=$(med "$(get "small$c/direct/rps")")
        nm=$(med "$(get "small$c/nginx/rps")")
        for p in "${PATHS[@]}"; do
            m=$(med "$(get "small$c/$p/rps")")
            xn=$(x "$m" "$nm"); xd=$(x "$m" "$dm")
            [ "$p" = nginx ] && xn=-
            [ "$p" = direct ] && xn=- && xd=-
            hw=$(top "$(get "small$c/$p/hwm")")
            row "$c" "$p" "$(fmt %.0f "$m")" "$xn" "$xd" \
                "$(awk -v u="$(med "$(get "small$c/$p/p50")")" 'BEGIN { printf "%.2f", u / 1000 }')" \
                "$(awk -v u="$(med "$(get "small$c/$p/p99")")" 'BEGIN { printf "%.2f", u / 1000 }')" \
                "$(na "$(med "$(get "small$c/$p/cpu")")" %.0f)" \
                "$(if [ -n "$hw" ]; then mib "$hw"; else echo -; fi)"
        done
    done
} >"$TMP/small.tsv"

if [ "$H2" = 1 ]; then
    {
        row path protocol "MB/s" "h2 / h1" "proxy CPU-s/GiB" "curl CPU-s/GiB" "MB/s of each run"
        for w in "${H2_WAYS[@]}"; do
            read -r p v <<<"$w"
            m=$(med "$(get "h2/$p/$v/mbs")")
            hr=-
            [ "$v" = h2 ] && hr=$(x "$m" "$(med "$(get "h2/$p/h1/mbs")")")
            row "$p" "$([ "$v" = h2 ] && echo "HTTP/2 (h2c)" || echo "HTTP/1.1")" "$(fmt %.0f "$m")" "$hr" \
                "$(fmt %.2f "$(med "$(get "h2/$p/$v/cpu")")")" "$(fmt %.2f "$(med "$(get "h2/$p/$v/ccpu")")")" \
                "$(get "h2/$p/$v/mbs")"
        done
    } >"$TMP/h2.tsv"
fi

# target NAME MEASURED OP LIMIT UNIT: one row of the targets table, with the verdict and the gap.
target() {
    local name=$1 m=$2 op=$3 lim=$4 unit=$5
    if [ -z "$m" ]; then row "$name" - "$op $lim$unit" "not measured" -; return; fi
    row "$name" "$m$unit" "$op $lim$unit" "$(verdict "$m" "$op" "$lim")" "$(awk -v m="$m" -v l="$lim" -v op="$op" 'BEGIN {
        g = (m - l) / l * 100
        if (op == ">=") { if (g >= 0) printf "%.0f%% to spare", g; else printf "%.0f%% short (needs %.2fx)", -g, l / m }
        else { if (g <= 0) printf "%.0f%% to spare", -g; else printf "%.0f%% over", g } }')"
}
sx() { if [ -z "$1" ] || [ -z "$2" ]; then echo ""; else ratio "$1" "$2"; fi; }
{
    row target measured limit verdict gap
    for label in single conc; do
        if [ "$label" = single ]; then what="1 x $SIZE_MB MiB"; else what="$CONC x $CONC_MB MiB"; fi
        target "stream MB/s / nginx MB/s, $what" \
            "$(sx "$(med "$(get "$label/stream/mbs")")" "$(med "$(get "$label/nginx/mbs")")")" ">=" "$TARGET_NGINX_X" x
        m=$(med "$(get "$label/stream/cpu")")
        target "stream CPU-s per GiB, $what" "$(if [ -n "$m" ]; then fmt %.2f "$m"; fi)" "<=" "$TARGET_CPU_GIB" ""
    done
    for p in stream spool; do
        [ "$p" = spool ] && [ "$SPOOL" = 0 ] && continue
        hw=$(top "$(get "conc/$p/hwm")")
        target "unpart ($p) peak RSS, $CONC concurrent uploads" "$(if [ -n "$hw" ]; then mib "$hw"; fi)" "<=" "$TARGET_RSS_MIB" " MiB"
    done
    for c in $SMALL_CONC; do
        target "stream small-form req/s / nginx req/s, c=$c" \
            "$(sx "$(med "$(get "small$c/stream/rps")")" "$(med "$(get "small$c/nginx/rps")")")" ">=" "$TARGET_NGINX_X" x
    done
    if [ "$H2" = 1 ]; then
        target "issue #5: stream h2c MB/s / its HTTP/1.1 MB/s" \
            "$(sx "$(med "$(get "h2/stream/h2/mbs")")" "$(med "$(get "h2/stream/h1/mbs")")")" ">=" 0.8 x
        target "reference, not a target: nginx h2c / its HTTP/1.1" \
            "$(sx "$(med "$(get "h2/nginx/h2/mbs")")" "$(med "$(get "h2/nginx/h1/mbs")")")" ">=" 0.8 x
    fi
} >"$TMP/targets.tsv"

txt_table() {
    awk -F'\t' '{ n = NR; if (NF > nf) nf = NF
        for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } }
        END { for (r = 1; r <= n; r++) { line = ""
                for (i = 1; i <= nf; i++) line = line sprintf("%-" w[i] "s  ", c[r, i])
                sub(/ +$/, "", line); print line
                if (r == 1) { line = ""; for (i = 1; i <= nf; i++) { d = ""; for (k = 0; k < w[i]; k++) d = d "-"; line = line d "  " }
                    sub(/ +$/, "", line); print line } } }' "$1"
}
md_table() {
    awk -F'\t' '{ line = "|"; for (i = 1; i <= NF; i++) line = line " " $i " |"; print line
        if (NR == 1) { line = "|"; for (i = 1; i <= NF; i++) line = line "---|"; print line } }' "$1"
}

NOTES="Accounting: MB/s is multipart body bytes / 10^6 / wall seconds (first connect to last response), median of $REPS; CPU is user+system seconds of the proxy per GiB (2^30) of multipart body, median (read in ticks of $(awk -v t="$TCK" 'BEGIN { print 1000 / t }') ms: coarse for small runs); peak RSS is VmHWM reset before each run (unpart's runs start once it is idle again: its thread count back to its idle count and its RSS no longer falling)$([ "$HWM_RESET" = 1 ] || echo ' (the reset FAILED: peaks cover earlier runs too)'), highest of the runs. nginx: CPU of the master and both workers, peak RSS of the two workers summed (the master, idle, had $NGINX_MASTER_RSS MiB). Small forms: wrk over keep-alive connections, $WRK_THREADS threads at most, ${DURATION} s per run, median of $SMALL_REPS; CPU in microseconds per request. Access logs: $([ "$ACCESS_LOG" = 1 ] && echo "on in both nginx and unpart (files in the temp directory)" || echo "off in both nginx and unpart (RUST_LOG=info,access=off)")."

echo
echo "== large uploads"
txt_table "$TMP/large.tsv"
echo
echo "== small forms ($FORM_BYTES-byte multipart body: 5 fields, then a $FILE_BYTES-byte file)"
txt_table "$TMP/small.tsv"
if [ "$H2" = 1 ]; then
    echo
    echo "== HTTP/2 and HTTP/1.1, curl -F of a $SIZE_MB MiB file"
    txt_table "$TMP/h2.tsv"
fi
echo
echo "== targets (issue #6, and #5's HTTP/2 ratio; for a quiet 2-core machine)"
txt_table "$TMP/targets.tsv"
echo
echo "$NOTES" | fold -s -w 100
echo "load average: $LOAD0 at the start, $LOAD1 at the end"

{
    echo "### Benchmark suite: unpart, nginx and the direct path"
    echo
    echo "\`bash benches/suite.sh\` on $(date -u '+%Y-%m-%d'): $(nproc) CPUs, $(uname -sr), load $LOAD0 at the start and $LOAD1 at the end;"
    echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), unpart release build with \`threads: 2\`, $NGINX_VERSION with"
    echo "\`worker_processes 2\`, \`proxy_request_buffering off\`, \`client_body_buffer_size 1m\`, keep-alive upstream; $WRK_VERSION."
    echo "Paths: direct (client to the counting upstream), nginx, unpart stream$([ "$SPOOL" = 1 ] && echo ", unpart spool (digests: $SPOOL_DIGESTS)")."
    echo "Settings: \`$KNOBS\`."
    echo
    echo "Large uploads (examples/upload_client, Content-Length, one field then the file):"
    echo
    md_table "$TMP/large.tsv"
    echo
    echo "Small forms ($FORM_BYTES-byte multipart body: 5 fields, then a $FILE_BYTES-byte file; wrk, ${DURATION} s per run):"
    echo
    md_table "$TMP/small.tsv"
    echo
    if [ "$H2" = 1 ]; then
        echo "HTTP/2 and HTTP/1.1 (curl $(curl -V | head -n 1 | awk '{ print $2 }') -F of a $SIZE_MB MiB file, median of $REPS; unpart stream with \`h2c: true\`, nginx on a second listener with \`http2\`):"
        echo
        md_table "$TMP/h2.tsv"
        echo
    fi
    echo "Targets (issue #6, and #5's HTTP/2 ratio; for a quiet 2-core machine):"
    echo
    md_table "$TMP/targets.tsv"
    echo
    echo "$NOTES"
} >"$TMP/results.md"
if ! cp "$TMP/results.md" "$OUT.tmp" || ! mv "$OUT.tmp" "$OUT"; then die "cannot write $OUT"; fi
echo "Markdown: $OUT"
