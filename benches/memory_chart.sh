#!/usr/bin/env bash
# RSS over time while uploads run, drawn as an SVG chart for the README (issue #4). Measures;
# not a test.
#
#   bash benches/memory_chart.sh                 # writes docs/memory.svg and docs/memory.csv
#   ROUNDS=2 SIZE_MB=64 CONC=2 bash benches/memory_chart.sh     # a quicker run
#
# Three processes, sampled from /proc/PID/status every 0.25 s:
#   unpart                 (release build) in front of backend A
#   backend A, /raw        the Go example backend (examples/go-backend) reading the raw body
#   backend B, /multipart  the same Go program taking the multipart body directly with
#                          r.ParseMultipartForm(32 MiB) + r.FormFile, as legacy handlers do
# Each round sends CONC concurrent SIZE_MB uploads through unpart to A and, at the same time,
# the same uploads straight to B; then everything idles for PAUSE seconds. Needs Debian's
# golang-go and python3 (the SVG is drawn without libraries). Everything binds 127.0.0.1,
# every wait is bounded, and a trap stops what it started.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SIZE_MB=${SIZE_MB:-100}
CONC=${CONC:-4}
PAUSE=${PAUSE:-8}
OUT=${OUT:-docs/memory.svg}
BUILD=${BUILD:-1}
for v in ROUNDS SIZE_MB CONC PAUSE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "memory_chart.sh: $v must be a positive integer" >&2; exit 2; }
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
REL="$ROOT/target/release"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/unpart-chart.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
die() { echo "memory_chart.sh: $*" >&2; exit 1; }
command -v go >/dev/null || die "needs go (apt-get install golang-go)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

if [[ $BUILD == 1 ]]; then
    echo "building (cargo build --release, go build) ..."
    timeout 1800 cargo build --release --bins --example upload_client >"$TMP/build.log" 2>&1 || die "cargo build failed: $TMP/build.log"
fi
(cd examples/go-backend && GOCACHE="$TMP/gocache" GOFLAGS=-mod=mod timeout 600 go build -o "$TMP/go-backend" .) || die "go build failed"

A=$(free_port); B=$(free_port); P=$(free_port); M=$(free_port)
timeout 3600 "$TMP/go-backend" -listen "127.0.0.1:$A" 2>"$TMP/a.log" & PIDS+=($!); PID_A=$!
timeout 3600 "$TMP/go-backend" -listen "127.0.0.1:$B" 2>"$TMP/b.log" & PIDS+=($!); PID_B=$!
cat >"$TMP/unpart.yaml" <<YAML
listen: 127.0.0.1:$P
admin: 127.0.0.1:$M
upstream: 127.0.0.1:$A
threads: 2
pid_file: $TMP/unpart.pid
upgrade_sock: $TMP/upgrade.sock
YAML
RUST_LOG=warn timeout 3600 "$REL/unpart" -c "$TMP/unpart.yaml" 2>"$TMP/unpart.log" & PIDS+=($!); PID_U=$!
for p in $A $B $P; do wait_port "$p" || die "a server did not start"; done

# `timeout` forks: sample the real processes, its children.
child() { local c; c=$(cat "/proc/$1/task/$1/children" 2>/dev/null | awk '{print $1}'); echo "${c:-$1}"; }
PU=$(child $PID_U); PA=$(child $PID_A); PB=$(child $PID_B)
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

CSV="${OUT%.svg}.csv"
mkdir -p "$(dirname "$OUT")"
echo "t_s,unpart_kib,backend_raw_kib,backend_multipart_kib,phase" >"$CSV"
PHASE=idle
T0=$(date +%s.%N)
sampler() {
    while :; do
        printf '%s,%s,%s,%s,%s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { printf "%.2f", a - b }')" "$(rss "$PU")" "$(rss "$PA")" "$(rss "$PB")" "$(cat "$TMP/phase" 2>/dev/null || echo idle)" >>"$CSV"
        sleep 0.25
    done
}
echo idle >"$TMP/phase"
sampler & PIDS+=($!)
sleep 3
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r/$ROUNDS: $CONC x $SIZE_MB MiB through unpart to /raw and directly to /multipart"
    echo upload >"$TMP/phase"
    timeout 900 "$REL/examples/upload_client" --addr "127.0.0.1:$P" --size-mb "$SIZE_MB" --conc "$CONC" --path /raw --expect file >"$TMP/via.out" & c1=$!
    timeout 900 "$REL/examples/upload_client" --addr "127.0.0.1:$B" --size-mb "$SIZE_MB" --conc "$CONC" --path /multipart --expect file >"$TMP/direct.out" & c2=$!
    wait $c1 || die "uploads through unpart failed: $(cat "$TMP/via.out")"
    wait $c2 || die "direct uploads failed: $(cat "$TMP/direct.out")"
    echo idle >"$TMP/phase"
    sleep "$PAUSE"
done
sleep 2

python3 - "$CSV" "$OUT" "$CONC" "$SIZE_MB" <<'PY'
import csv, sys
path, out, conc, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = list(csv.DictReader(open(path)))
t = [float(r["t_s"]) for r in rows]
series = [
    ("unpart", "unpart_kib", "#d62728"),
    ("Go backend behind unpart (raw body)", "backend_raw_kib", "#1f77b4"),
    ("Go backend, ParseMultipartForm directly", "backend_multipart_kib", "#7f7f7f"),
]
W, H, L, R, T, B = 900, 470, 70, 20, 40, 120
tmax = max(t) or 1
ymax = max(int(r[k]) for r in rows for _, k, _ in series) / 1024 * 1.1 or 1
step = next(s for s in [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000] if ymax / s <= 8)
X = lambda v: L + (W - L - R) * v / tmax
Y = lambda mib: H - B - (H - T - B) * mib / ymax
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="22" text-anchor="middle" font-size="15">Resident memory while {conc} concurrent {size} MiB uploads run, then idle</text>']
# upload phases shaded
start = None
for i, r in enumerate(rows + [{"phase": "idle"}]):
    if r["phase"] == "upload" and start is None:
        start = t[i]
    elif r["phase"] != "upload" and start is not None:
        svg.append(f'<rect x="{X(start):.1f}" y="{T}" width="{X(t[i-1]) - X(start):.1f}" height="{H-T-B}" fill="#f2f2f2"/>')
        start = None
v = 0
while v <= ymax:
    svg.append(f'<line x1="{L}" x2="{W-R}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>')
    svg.append(f'<text x="{L-6}" y="{Y(v)+4:.1f}" text-anchor="end">{v}</text>')
    v += step
svg.append(f'<text x="16" y="{(T+H-B)/2}" transform="rotate(-90 16 {(T+H-B)/2})" text-anchor="middle">RSS (MiB)</text>')
for s in range(0, int(tmax) + 1, max(1, int(tmax / 10))):
    svg.append(f'<text x="{X(s):.1f}" y="{H-B+16}" text-anchor="middle">{s}</text>')
svg.append(f'<text x="{(L+W-R)/2}" y="{H-B+34}" text-anchor="middle">seconds (grey: uploads running)</text>')
for n, (label, key, colour) in enumerate(series):
    pts = " ".join(f"{X(t[i]):.1f},{Y(int(r[key]) / 1024):.1f}" for i, r in enumerate(rows))
    svg.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
    peak = max(int(r[key]) for r in rows) / 1024
    last = int(rows[-1][key]) / 1024
    y = H - 62 + n * 20
    svg.append(f'<rect x="{L}" y="{y-6}" width="12" height="4" fill="{colour}"/>')
    svg.append(f'<text x="{L+16}" y="{y}">{label}: peak {peak:.0f} MiB, at the end {last:.0f} MiB</text>')
svg.append('</svg>')
open(out, "w").write("\n".join(svg) + "\n")
for label, key, _ in series:
    print(f"{label}: peak {max(int(r[key]) for r in rows)/1024:.1f} MiB, end {int(rows[-1][key])/1024:.1f} MiB")
print(f"wrote {out} and {path}")
PY
