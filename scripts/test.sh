#!/usr/bin/env bash
# Runs Berth's whole test suite: formatting, lints, unit, integration and end-to-end tests, on
# both deployments (SQLite + filesystem; PostgreSQL + S3). Installs what it needs when missing:
# the registry clients and PostgreSQL from Debian's packages, Garage (S3) from crates.io (built
# once, cached under ~/.cache/berth-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- registry clients for the end-to-end tests -------------------------------------------------
missing=()
for tool in skopeo buildah openssl curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]} (Debian packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- a throwaway PostgreSQL for the scale-out deployment ---------------------------------------
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
    scripts/pg.sh stop "$work/pg" || true
    scripts/garage.sh stop "$work/garage" || true
    rm -rf "$work"
}
trap cleanup EXIT
echo "==> starting PostgreSQL"
BERTH_TEST_PG_URL=$(scripts/pg.sh start "$work/pg")
export BERTH_TEST_PG_URL

# --- a throwaway S3 server (Garage) for the scale-out deployment ---------------------------------
echo "==> starting Garage (S3)"
s3_env=$(scripts/garage.sh start "$work/garage")
while IFS='=' read -r name value; do export "$name=$value"; done <<<"$s3_env"

# --- the suite ----------------------------------------------------------------------------------
echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "==> cargo test"
cargo test --all-targets
