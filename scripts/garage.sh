#!/usr/bin/env bash
# A throwaway single-node Garage (a production S3-compatible object store) for the scale-out
# tests.
#   scripts/garage.sh start DIR   -> prints BERTH_TEST_S3_* assignments for `eval`
#   scripts/garage.sh stop DIR
# Garage is built from crates.io once and cached under ${BERTH_TOOLS:-~/.cache/berth-tools};
# the first build takes a while on 2 cores, later runs reuse the binary.
set -euo pipefail

tools=${BERTH_TOOLS:-$HOME/.cache/berth-tools}
garage_version=2.5.0

garage_bin() {
    if command -v garage >/dev/null 2>&1; then command -v garage; return; fi
    local bin="$tools/garage/bin/garage"
    if [ ! -x "$bin" ]; then
        echo "==> building garage $garage_version from crates.io (cached in $tools; first time only)" >&2
        # A test tool: trade peak optimisation for build time (opt-level 1, no LTO), and leave out
        # what the tests do not use (metrics, the LMDB engine, K2V): ~5 minutes on 2 cores
        # instead of ~25, and within 10 % of the optimised build's S3 throughput here.
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true \
            cargo install --locked --quiet --version "$garage_version" --root "$tools/garage" \
            --no-default-features --features bundled-libs,sqlite garage >&2
    fi
    echo "$bin"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cmd=${1:?start|stop}; dir=${2:?directory}
case "$cmd" in
start)
    bin=$(garage_bin)
    mkdir -p "$dir/meta" "$dir/data"
    s3_port=$(free_port); rpc_port=$(free_port); admin_port=$(free_port)
    cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
TOML
    g() { "$bin" -c "$dir/garage.toml" "$@"; }
    nohup "$bin" -c "$dir/garage.toml" server >"$dir/server.log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
        g node id -q >/dev/null 2>&1 && break
        sleep 0.2
    done
    node=$(g node id -q 2>/dev/null | cut -c1-16)
    g layout assign -z dc1 -c 1G "$node" >/dev/null
    g layout apply --version 1 >/dev/null
    for _ in $(seq 1 50); do
        g bucket create berth-test >/dev/null 2>&1 && break
        sleep 0.2
    done
    keyinfo=$(g key create berth-test-key)
    key_id=$(echo "$keyinfo" | awk -F': *' '/Key ID/ {print $2; exit}' | tr -d ' ')
    secret=$(echo "$keyinfo" | awk -F': *' '/Secret key/ {print $2; exit}' | tr -d ' ')
    g bucket allow --read --write --owner berth-test --key berth-test-key >/dev/null
    echo "BERTH_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port"
    echo "BERTH_TEST_S3_BUCKET=berth-test"
    echo "BERTH_TEST_S3_KEY_ID=$key_id"
    echo "BERTH_TEST_S3_SECRET=$secret"
    ;;
stop)
    if [ -f "$dir/pid" ]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; fi
    ;;
esac
