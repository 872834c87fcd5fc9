#!/usr/bin/env bash
# Upload throughput and memory benchmark for unpart (issue #2). Not a test: it measures.
#
#   bash benches/upload.sh
#   SIZE_MB=64 CONC=4 CONC_MB=16 bash benches/upload.sh      # a quick, smaller run
#
# It builds the release binaries, starts a counting upstream (examples/count_upstream.rs) and
# unpart (release, threads: 2) on free 127.0.0.1 ports, and sends multipart/form-data uploads
# (one small field, then the file; Content-Length framing) with examples/upload_client.rs,
# through unpart and directly to the upstream:
#   a. one SIZE_MB upload (default 1024 MiB),
#   b. CONC concurrent CONC_MB uploads (default 16 x 256 MiB),
#   c. unpart's peak RSS (VmHWM) and current RSS (VmRSS) afterwards,
#   d. spool mode (issue #3): one SIZE_MB upload to a spool route, its MB/s, unpart's CPU,
#      peak RSS during the phase (VmHWM reset through /proc/PID/clear_refs) and the bytes
#      unpart wrote to disk (/proc/PID/io write_bytes), against nginx-upload-module's
#      200-220 MB/s on this machine kind (DESIGN.md section 6; not measured by this script),
#   e. HTTP/2 (issue #5): one SIZE_MB upload with curl -F over h2c and over HTTP/1.1 to the same
#      unpart (curl sends 16 KiB HTTP/2 frames), target h2 >= 0.8x HTTP/1.1,
# and prints each measurement next to its target: unpart >= 0.9x direct throughput, peak RSS
# <= 32 MiB with 16 concurrent uploads. The payload is generated in memory; only spool mode
# writes to disk, in the script's temp directory.
# MB/s is whole multipart body bytes (10^6) over the wall time from connect to the end of the
# response; the upstream's byte count is checked against every upload.
#
# Each measurement is REPS (default 3) alternating direct/unpart runs; the median counts.
# Environment: SIZE_MB, CONC, CONC_MB, REPS, REQ_TIMEOUT (seconds per client run, default 600),
# LIFETIME (seconds the servers may live at most, default 3600), BUILD=0 to skip the build,
# REL=DIR to take the binaries from DIR instead of target/release. Helpers: benches/lib.sh.
# Everything binds 127.0.0.1; every wait is bounded; a trap stops everything it started and
# removes its temp directory on exit, error or Ctrl-C.

set -euo pipefail

SIZE_MB=${SIZE_MB:-1024}
CONC=${CONC:-16}
CONC_MB=${CONC_MB:-256}
REPS=${REPS:-3}
REQ_TIMEOUT=${REQ_TIMEOUT:-600}
LIFETIME=${LIFETIME:-3600}
BUILD=${BUILD:-1}
TARGET_RATIO=0.9
TARGET_RSS_MIB=32
# nginx-upload-module (parse, hash, store) on this machine kind: the top of DESIGN.md's range.
NGINX_UPLOAD_MB_S=220

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init upload.sh
need_posint SIZE_MB CONC CONC_MB REPS REQ_TIMEOUT LIFETIME
[[ $BUILD =~ ^[01]$ ]] || { echo "$ME: BUILD must be 0 or 1" >&2; exit 2; }

build_release --examples --bins
start_upstream
start_unpart "h2c: true
routes:
  - prefix: /spool/
    mode: spool
spool:
  dir: $TMP/spool
  max_total_bytes: 0
  digests: [sha256]"

echo "== unpart upload benchmark (issue #2)"
print_env
echo "unpart:   $REL/unpart (release), threads: 2, pid $UNPART_PID, listen $LISTEN, upstream $UPSTREAM"
echo "client:   examples/upload_client, Content-Length framing, 1 field + file, 1 MiB writes"
echo "MB/s = multipart body bytes / 10^6 / wall seconds (connect .. end of response)"

# Warm-up, and a check that both paths answer as expected.
run_client warm_direct "$UPSTREAM" 8 1 body
run_client warm_unpart "$LISTEN" 8 1 file
echo "warm-up:  8 MiB direct and through unpart OK, unpart VmRSS $(mib "$(kib_of "$UNPART_PID" VmRSS)") MiB"

# phase LABEL SIZE_MB CONC: REPS rounds, each one direct run then one unpart run (alternating,
# so both see the same background noise); prints medians, every run, and the ratio of medians.
# Sets RATIO.
phase() {
    local label=$1 size=$2 conc=$3 i c0 c1 out
    local d=() u=() dmin=() dmax=() umin=() umax=() cpu=()
    for i in $(seq 1 "$REPS"); do
        out="$TMP/${label}_direct_$i"
        run_client "${label}_direct_$i" "$UPSTREAM" "$size" "$conc" body
        d+=("$(field "$out.out" mb_s)")
        dmin+=("$(field "$out.out" min_s)")
        dmax+=("$(field "$out.out" max_s)")
        out="$TMP/${label}_unpart_$i"
        c0=$(cpu_s "$UNPART_PID")
        run_client "${label}_unpart_$i" "$LISTEN" "$size" "$conc" file
        c1=$(cpu_s "$UNPART_PID")
        u+=("$(field "$out.out" mb_s)")
        umin+=("$(field "$out.out" min_s)")
        umax+=("$(field "$out.out" max_s)")
        cpu+=("$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')")
    done
    local md mu
    md=$(median "${d[@]}")
    mu=$(median "${u[@]}")
    RATIO=$(ratio "$mu" "$md")
    printf 'direct:  %8.1f MB/s median   runs: %s   per upload %s..%s s\n' "$md" "${d[*]}" \
        "$(lowest "${dmin[@]}")" "$(highest "${dmax[@]}")"
    printf 'unpart:  %8.1f MB/s median   runs: %s   per upload %s..%s s\n' "$mu" "${u[*]}" \
        "$(lowest "${umin[@]}")" "$(highest "${umax[@]}")"
    echo "unpart CPU (user+sys) per run: ${cpu[*]} s"
    echo "ratio unpart/direct (medians): $RATIO   target >= $TARGET_RATIO: $(verdict "$RATIO" ">=" "$TARGET_RATIO")"
}

# a. One large upload.
echo
echo "== a. 1 upload of $SIZE_MB MiB, $REPS runs per path"
phase single "$SIZE_MB" 1
sr=$RATIO
echo "unpart after a: VmHWM $(mib "$(kib_of "$UNPART_PID" VmHWM)") MiB, VmRSS $(mib "$(kib_of "$UNPART_PID" VmRSS)") MiB"

# b. Concurrent uploads.
echo
echo "== b. $CONC concurrent uploads of $CONC_MB MiB each, $REPS runs per path (aggregate MB/s)"
phase conc "$CONC_MB" "$CONC"
cr=$RATIO

# c. Memory.
echo
echo "== c. unpart memory after the runs"
hwm=$(mib "$(kib_of "$UNPART_PID" VmHWM)")
rss=$(mib "$(kib_of "$UNPART_PID" VmRSS)")
echo "peak RSS (VmHWM): $hwm MiB   target <= $TARGET_RSS_MIB MiB with $CONC concurrent uploads: $(verdict "$hwm" "<=" "$TARGET_RSS_MIB")"
echo "VmRSS now:        $rss MiB"

# d. Spool mode.
echo
echo "== d. spool mode: 1 upload of $SIZE_MB MiB to a spool route (sha256), $REPS runs"
echo 5 >"/proc/$UNPART_PID/clear_refs" 2>/dev/null || echo "(cannot reset VmHWM: peak covers all phases)"
sp=() spcpu=() spdisk=()
for i in $(seq 1 "$REPS"); do
    c0=$(cpu_s "$UNPART_PID")
    w0=$(awk '$1 == "write_bytes:" { print $2 }' "/proc/$UNPART_PID/io")
    run_client "spool_$i" "$LISTEN" "$SIZE_MB" 1 file --path /spool/upload
    w1=$(awk '$1 == "write_bytes:" { print $2 }' "/proc/$UNPART_PID/io")
    c1=$(cpu_s "$UNPART_PID")
    sp+=("$(field "$TMP/spool_$i.out" mb_s)")
    spcpu+=("$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')")
    spdisk+=("$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", (b - a) / 1048576 }')")
done
spm=$(median "${sp[@]}")
sphwm=$(mib "$(kib_of "$UNPART_PID" VmHWM)")
spr=$(ratio "$spm" "$NGINX_UPLOAD_MB_S")
printf 'spool:   %8.1f MB/s median   runs: %s\n' "$spm" "${sp[*]}"
echo "unpart CPU (user+sys) per run: ${spcpu[*]} s"
echo "written to disk per run: ${spdisk[*]} MiB (file: $SIZE_MB MiB)"
echo "peak RSS during spool runs (VmHWM): $sphwm MiB"
echo "vs nginx-upload-module's $NGINX_UPLOAD_MB_S MB/s: ${spr} x"
[ -z "$(ls -A "$TMP/spool")" ] || die "spool directory not empty after the runs"

# e. HTTP/2 against HTTP/1.1, same client (curl), same unpart.
echo
echo "== e. HTTP/2 (h2c) vs HTTP/1.1 through unpart: curl -F of a $SIZE_MB MiB file, $REPS runs each"
fill_file "$TMP/h2.bin" "$SIZE_MB"
curl_mb_s() {
    local out code up secs
    out=$(curl_upload "$1" "http://$LISTEN/upload" "$TMP/h2.bin")
    read -r code up secs _ <<<"$out"
    [ "$code" = 200 ] || die "curl $1 got $code"
    awk -v b="$up" -v t="$secs" 'BEGIN { printf "%.1f", b / 1e6 / t }'
}
h1=() h2=()
for i in $(seq 1 "$REPS"); do
    h1+=("$(curl_mb_s --http1.1)")
    h2+=("$(curl_mb_s --http2-prior-knowledge)")
done
h1m=$(median "${h1[@]}")
h2m=$(median "${h2[@]}")
h2r=$(ratio "$h2m" "$h1m")
printf 'HTTP/1.1: %8.1f MB/s median   runs: %s\n' "$h1m" "${h1[*]}"
printf 'HTTP/2:   %8.1f MB/s median   runs: %s\n' "$h2m" "${h2[*]}"
echo "ratio h2/h1: $h2r   target >= 0.8: $(verdict "$h2r" ">=" 0.8)"
rm -f "$TMP/h2.bin" "$TMP/curl.resp" "$TMP/curl.time"

# f. Summary.
echo
echo "== summary                       measured     target"
printf '%-30s %8s x   >= %s x   %s\n' "1 x $SIZE_MB MiB unpart/direct" "$sr" "$TARGET_RATIO" "$(verdict "$sr" ">=" "$TARGET_RATIO")"
printf '%-30s %8s x   >= %s x   %s\n' "$CONC x $CONC_MB MiB unpart/direct" "$cr" "$TARGET_RATIO" "$(verdict "$cr" ">=" "$TARGET_RATIO")"
printf '%-30s %6s MiB   <= %s MiB   %s\n' "unpart peak RSS" "$hwm" "$TARGET_RSS_MIB" "$(verdict "$hwm" "<=" "$TARGET_RSS_MIB")"
printf '%-30s %6s MB/s  %s x nginx-upload-module (%s MB/s, reference)\n' "spool 1 x $SIZE_MB MiB" "$spm" "$spr" "$NGINX_UPLOAD_MB_S"
printf '%-30s %8s x   >= 0.8 x   %s\n' "h2/h1 curl $SIZE_MB MiB" "$h2r" "$(verdict "$h2r" ">=" 0.8)"
kill -0 "$UNPART_PID" 2>/dev/null || die "unpart exited during the run"
