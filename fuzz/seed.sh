#!/usr/bin/env bash
# Writes the differential target's seed corpus (fuzz/corpus/differential) in its input layout:
# 1 limits byte, 4 chunk-size bytes, the boundary, LF, the body (see fuzz_targets/differential.rs).
# Seeds: every captured client body (../shared/corpus, else the vendored tests/corpus), each
# with a few chunkings, plus hand-written bodies for the grammar's corners.
set -euo pipefail
cd "$(dirname "$0")"
src=${1:-../../shared/corpus}
[ -d "$src/cases" ] || src=../tests/corpus
out=corpus/differential
mkdir -p "$out"

seed() { # name, 5 control bytes as printf escapes, boundary, body (printf format)
    { printf "$2"; printf '%s\n' "$3"; printf -- "$4"; } >"$out/$1"
}

n=0
for d in "$src"/cases/*/; do
    [ -f "$d/body.bin" ] || continue
    b=$(grep -io 'boundary=[^;]*' "$d/head.txt" | head -n1 | cut -d= -f2- | tr -d '\r"')
    name=$(basename "$d")
    for ctl in '\x00\xff\xff\xff\xff' '\x00\x00\x00\x00\x00' '\x00\x06\x3f\x8f\x02' '\x07\x10\x80\x01\xc0'; do
        { printf "$ctl"; printf '%s\n' "$b"; cat "$d/body.bin"; } >"$out/$name-$n"
        n=$((n + 1))
    done
done

c='\x00\x05\x0b\x1f\x90'
seed lf-mode "$c" b '--b\nContent-Disposition: form-data; name="a"\n\nx\n--b\nContent-Disposition: form-data; name="f"; filename="a.txt"\n\ndata\n--b--\n'
seed preamble-epilogue "$c" b 'preamble --b\r\n--bx\r\n--b \t\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--b--  \r\nepilogue'
seed lookalike "$c" xyz '--xyz\r\nContent-Disposition: form-data; name="f"; filename="f"\r\n\r\n\r\n--xyzz\r\n--xy\r\n-\r\n--xyz--\r\n'
seed dash-at-start "$c" b '--b\r\nContent-Disposition: form-data; name="e"\r\n\r\n--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--b--'
seed rfc2231 "$c" b "--b\r\nContent-Disposition: form-data; name*=UTF-8''%%C3%%A9; filename*=UTF-8''r%%C3%%A9sum%%C3%%A9.txt\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n"
seed folded "$c" b '--b\r\nContent-Disposition: form-data;\r\n name="a"\r\nX-Other:  v \r\n\r\nv\r\n--b--\r\n'
seed quoted "$c" b '--b\r\nContent-Disposition: form-data; name="a\\"b"; filename="C:\\\\dir\\\\x.txt"\r\n\r\nv\r\n--b--\r\n'
seed injection "$c" b '--b\r\nContent-Disposition: form-data; name="Host"\r\n\r\nevil\r\n--b\r\nContent-Disposition: form-data; name="X-Form-x"\r\n\r\na\x00b\r\nc\r\n--b--\r\n'
echo "$(ls "$out" | wc -l) seeds in fuzz/$out (from $src)"
