# shellcheck shell=bash
# Helpers shared by the benchmark scripts in benches/ (upload.sh, suite.sh); sourced, not run.
#
# bench_init NAME sets:
#   ME        the script's name, for messages
#   ROOT      the repository (the scripts cd there)
#   REL       the release binaries: $REL if set (made absolute), else $ROOT/target/release
#   TMP       a private temp directory under ${TMPDIR:-/tmp}
# and a trap that, on exit, error or Ctrl-C, stops every process recorded in
#   CLIENT_PID  the client run in progress (a `timeout` wrapper), if any
#   CHILDREN    the servers themselves (what the `timeout` wrappers run): stopped first, since a
#               KILLed `timeout` would leave its child running
#   PIDS        the servers' `timeout` wrappers
# then calls bench_cleanup_hook if the script defines one, and removes $TMP.
# Only PIDs the script started are ever signalled; nothing is stopped by name.

bench_init() {
    ME=$1
    if [ -n "${REL:-}" ]; then
        REL=$(cd "$REL" 2>/dev/null && pwd) || { echo "$ME: REL is not a directory" >&2; exit 2; }
    fi
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    ROOT=$(pwd)
    REL=${REL:-$ROOT/target/release}
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/unpart-bench.XXXXXX")
    PIDS=()
    CHILDREN=()
    CLIENT_PID=""
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local first=()
    if [ -n "$CLIENT_PID" ]; then first+=("$CLIENT_PID"); fi
    first+=("${CHILDREN[@]}")
    if [ "${#first[@]}" -gt 0 ]; then stop "${first[@]}"; fi
    if declare -F bench_cleanup_hook >/dev/null; then bench_cleanup_hook || true; fi
    if [ "${#PIDS[@]}" -gt 0 ]; then stop "${PIDS[@]}"; fi
    rm -rf "$TMP"
    exit "$rc"
}

# Exits with status 2 unless each named variable holds a positive integer.
need_posint() {
    local v
    for v in "$@"; do
        if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
            echo "$ME: $v must be a positive integer, not '${!v}'" >&2
            exit 2
        fi
    done
}

die() {
    echo "$ME: $*" >&2
    local f
    for f in "$TMP"/*.log; do
        [ -f "$f" ] || continue
        echo "--- tail of $(basename "$f")" >&2
        tail -n 20 "$f" >&2
    done
    exit 1
}

alive() {
    local p
    for p in "$@"; do
        kill -0 "$p" 2>/dev/null && return 0
    done
    return 1
}

# Stops the given PIDs: TERM, up to 10 s to exit, then KILL. Only PIDs this script started.
stop() {
    local p _
    for p in "$@"; do
        kill "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 100); do
        alive "$@" || break
        sleep 0.1
    done
    for p in "$@"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}

# Seconds since the epoch with fractions, for deadlines.
now() { date +%s.%N; }
before() { awk -v a="$(now)" -v b="$1" 'BEGIN { exit !(a < b) }'; }
deadline() { awk -v a="$(now)" -v s="$1" 'BEGIN { printf "%.3f", a + s }'; }

# The PIDs of the children of $1, one a line (none: empty).
children_of() { ps -o pid= --ppid "$1" | tr -d ' ' || true; }

# The PID of the only child of $1 (the server that `timeout` runs), waiting up to 5 s.
child_of() {
    local d c
    d=$(deadline 5)
    while before "$d"; do
        c=$(children_of "$1" | head -n 1)
        if [ -n "$c" ]; then
            echo "$c"
            return 0
        fi
        sleep 0.05
    done
    return 1
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port below the kernel's ephemeral range that nothing listens on.
pick_port() {
    local p _
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        if ! port_in_use "$p"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# status_of PID KEY: a field of /proc/PID/status (VmRSS and VmHWM in KiB, Threads a count).
status_of() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
kib_of() { status_of "$@"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# cpu_jiffies: the machine's idle and total CPU time so far, "idle total" (iowait is not idle).
cpu_jiffies() { awk '$1 == "cpu" { print $5, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# Waits (at most $1 seconds) until the machine is quiet: its CPUs at least 90 % idle over half a
# second (iowait counts as busy) and under 64 MiB of page cache dirty or under writeback. A
# spool run leaves gigabytes to write back, and measuring meanwhile measures the disk. Prints
# a note when it gives up.
quiet() {
    local d idle dirty a b
    d=$(deadline "$1")
    while :; do
        a=$(cpu_jiffies)
        sleep 0.5
        b=$(cpu_jiffies)
        idle=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
            t = y[2] - x[2]; printf "%d", (t > 0 ? 100 * (y[1] - x[1]) / t : 100) }')
        dirty=$(awk '$1 == "Dirty:" || $1 == "Writeback:" { k += $2 } END { print k + 0 }' /proc/meminfo)
        [ "$idle" -ge 90 ] && [ "$dirty" -lt 65536 ] && return 0
        if ! before "$d"; then
            echo "  note: machine not quiet after $1 s (CPU ${idle}% idle, $((dirty / 1024)) MiB dirty or in writeback)"
            return 0
        fi
    done
}

# fill_file PATH MB: MB MiB of 'h', the file curl uploads (no CR, so no delimiter inside).
fill_file() { head -c "$(($2 * 1048576))" /dev/zero | tr '\0' 'h' >"$1"; }
# curl_upload FLAG URL FILE: one curl -F upload (a field "title", then FILE as "file") with
# FLAG (--http1.1, --http2-prior-knowledge); prints "status bytes_sent seconds http_version
# curl_cpu_seconds". The answer's body is left in $TMP/curl.resp. Call it as an assignment,
# out=$(curl_upload ...), so that a failure stops the script.
curl_upload() {
    local out
    out=$( { TIMEFORMAT='%U %S'; time timeout "$REQ_TIMEOUT" curl -sS "$1" -o "$TMP/curl.resp" \
        -w '%{http_code} %{size_upload} %{time_total} %{http_version}' -F title=bench \
        -F "file=@$3" "$2"; } 2>"$TMP/curl.time") || die "curl $1 $2 failed: $(cat "$TMP/curl.time")"
    echo "$out $(tail -n 1 "$TMP/curl.time" | awk '{ print $1 + $2 }')"
}
# user+system CPU seconds of a process (all its threads).
cpu_s() {
    local tck
    tck=$(getconf CLK_TCK)
    sed 's/.*) //' "/proc/$1/stat" | awk -v t="$tck" '{ printf "%.2f", ($12 + $13) / t }'
}

# The value of KEY in a `key=value key=value` line in FILE.
field() { tr ' ' '\n' <"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
    END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
lowest() { printf '%s\n' "$@" | sort -g | head -n 1; }
highest() { printf '%s\n' "$@" | sort -g | tail -n 1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN {
    ok = (op == ">=") ? (a >= b) : (a <= b); print ok ? "MET" : "NOT MET" }'; }

# build_release CARGO_ARGS...: the release build, unless BUILD=0.
build_release() {
    if [ "$BUILD" = 1 ]; then
        echo "building release binaries (cargo build --release $*) ..."
        timeout 1800 cargo build --release "$@" >"$TMP/build.log" 2>&1 || die "cargo build failed"
    fi
    local b
    for b in unpart examples/count_upstream examples/upload_client; do
        [ -x "$REL/$b" ] || die "missing $REL/$b (run without BUILD=0, or set REL)"
    done
}

# Starts the counting upstream, which picks its own port and writes it down. Sets UPSTREAM
# (its address) and UPSTREAM_PID.
start_upstream() {
    timeout -k 10 -s TERM "$LIFETIME" "$REL/examples/count_upstream" --listen 127.0.0.1:0 \
        --port-file "$TMP/upstream.port" 2>"$TMP/upstream.log" &
    PIDS+=("$!")
    UPSTREAM_PID=$(child_of "$!") || die "count_upstream did not start"
    CHILDREN+=("$UPSTREAM_PID")
    local d
    d=$(deadline 10)
    until [ -s "$TMP/upstream.port" ]; do
        before "$d" || die "count_upstream did not start"
        sleep 0.05
    done
    UPSTREAM="127.0.0.1:$(cat "$TMP/upstream.port")"
}

# start_unpart EXTRA_YAML: starts unpart (threads: 2) in front of $UPSTREAM on two picked
# ports, with EXTRA_YAML (top-level keys) appended to its configuration; $SPOOL in EXTRA_YAML
# is not expanded here, the caller expands. RUST_LOG is UNPART_LOG (default info: with the
# access log). Sets LISTEN, ADMIN and UNPART_PID.
start_unpart() {
    local extra=$1 _ tpid ok d
    UNPART_PID=""
    # A lost race to bind shows as an early exit: try again with other ports.
    for _ in 1 2 3 4 5; do
        LISTEN="127.0.0.1:$(pick_port)" || die "no free port"
        ADMIN="127.0.0.1:$(pick_port)" || die "no free port"
        [ "$LISTEN" != "$ADMIN" ] || continue
        cat >"$TMP/unpart.yaml" <<EOF
listen: $LISTEN
admin: $ADMIN
upstream: $UPSTREAM
threads: 2
pid_file: $TMP/unpart.pid
upgrade_sock: $TMP/upgrade.sock
grace_period_seconds: 0
graceful_shutdown_timeout_seconds: 1
$extra
EOF
        RUST_LOG=${UNPART_LOG:-info} timeout -k 10 -s TERM "$LIFETIME" "$REL/unpart" -c "$TMP/unpart.yaml" \
            >/dev/null 2>"$TMP/unpart.log" &
        tpid=$!
        PIDS+=("$tpid")
        UNPART_PID=$(child_of "$tpid") || UNPART_PID=""
        [ -n "$UNPART_PID" ] && CHILDREN+=("$UNPART_PID")
        ok=0
        d=$(deadline 15)
        while [ -n "$UNPART_PID" ] && before "$d" && kill -0 "$UNPART_PID" 2>/dev/null; do
            if curl -sf --max-time 1 "http://$ADMIN/healthz" >/dev/null 2>&1 &&
                port_in_use "${LISTEN#*:}"; then
                ok=1
                break
            fi
            sleep 0.05
        done
        [ "$ok" = 1 ] && return 0
        stop ${UNPART_PID:+"$UNPART_PID"} "$tpid"
        unset 'PIDS[${#PIDS[@]}-1]'
        [ -n "$UNPART_PID" ] && unset 'CHILDREN[${#CHILDREN[@]}-1]'
        UNPART_PID=""
    done
    die "unpart did not become healthy"
}

# run_client NAME ADDR SIZE_MB CONC EXPECT [ARGS...]: one examples/upload_client run, output
# in $TMP/NAME.out; a failure or a run longer than REQ_TIMEOUT seconds is fatal.
run_client() {
    local name=$1 addr=$2 size=$3 conc=$4 expect=$5
    shift 5
    timeout -s TERM "$REQ_TIMEOUT" "$REL/examples/upload_client" --addr "$addr" \
        --size-mb "$size" --conc "$conc" --expect "$expect" --timeout 60 "$@" \
        >"$TMP/$name.out" 2>"$TMP/$name.log" &
    CLIENT_PID=$!
    if ! wait "$CLIENT_PID"; then
        CLIENT_PID=""
        die "client run '$name' failed or ran out of its ${REQ_TIMEOUT} s: $(cat "$TMP/$name.log")"
    fi
    CLIENT_PID=""
}

# The lines every report starts with.
print_env() {
    local changed
    echo "date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host:     $(nproc) CPUs, $(uname -sr), $(awk '/MemTotal/ { printf "%.1f GiB RAM", $2/1048576 }' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
    changed=$(git -C "$ROOT" diff --name-only HEAD -- src Cargo.toml Cargo.lock 2>/dev/null | tr '\n' ' ')
    echo "commit:   $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)${changed:+ + uncommitted changes in: $changed}"
}
