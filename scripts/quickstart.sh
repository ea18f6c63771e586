#!/usr/bin/env bash
# Runs the README's quick start exactly as written, so it cannot rot:
#   scripts/quickstart.sh [BERTH_BINARY]    (default: target/debug/berth)
# The `berth serve` block and the client block are taken from README.md between their markers.
# They run in a private network namespace (127.0.0.1:5000 is free there whatever runs on this
# machine) with `berth` first on PATH and buildah's storage in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
berth=$(realpath "${1:-target/debug/berth}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

block() { # the fenced block between <!-- $1 --> and <!-- /$1 -->
    awk -v start="<!-- $1 -->" -v stop="<!-- /$1 -->" '
        $0 == start { inside = 1; next } $0 == stop { inside = 0 }
        inside && /^```/ { fence = !fence; next } inside && fence { print }' README.md
}
block quickstart:serve >"$work/serve.sh"
block quickstart >"$work/steps.sh"
[ -s "$work/serve.sh" ] && [ -s "$work/steps.sh" ] || { echo "quick start blocks not found in README.md" >&2; exit 1; }

mkdir -p "$work/bin" "$work/run"
ln -s "$berth" "$work/bin/berth"
cat >"$work/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$work/storage"
runroot = "$work/storage-run"
CONF

unshare --net bash -c '
    set -euo pipefail
    work=$1
    ip link set lo up
    export PATH="$work/bin:$PATH" CONTAINERS_STORAGE_CONF="$work/storage.conf" BUILDAH_ISOLATION=chroot
    cd "$work/run"
    # A session of its own, so that stopping it stops berth too (not only the shell running it).
    setsid bash "$work/serve.sh" >"$work/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf http://127.0.0.1:5000/v2/ >/dev/null && break; sleep 0.1; done
    status=0
    bash -euo pipefail -x "$work/steps.sh" || status=$?
    kill -- -"$server"; wait "$server" || true
    [ "$status" = 0 ] || { echo "--- berth log"; cat "$work/serve.log"; }
    exit "$status"
' quickstart "$work"
