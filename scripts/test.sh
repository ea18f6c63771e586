#!/usr/bin/env bash
# Runs Berth's whole test suite: formatting, lints, unit, integration and end-to-end tests, on
# both deployments (SQLite + filesystem; PostgreSQL + S3). Installs what it needs when missing:
# the registry clients and PostgreSQL from Debian's packages, the ORAS Python SDK from PyPI (in a
# virtual environment), Garage (S3) from crates.io (built
# once, cached under ~/.cache/berth-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- registry clients for the end-to-end tests -------------------------------------------------
missing=()
for tool in skopeo buildah podman openssl curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# The reference registry (distribution 2.8), whose storage the import tests adopt.
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
# A real browser for the web console's tests: Debian's Chromium and its WebDriver.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]} (Debian packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- the ORAS Python SDK (PyPI) in a virtual environment, for the oras-py end-to-end test ----------
tools=${BERTH_TOOLS:-$HOME/.cache/berth-tools}
oras_venv="$tools/oras-py"
if [ ! -x "$oras_venv/bin/python" ] || ! "$oras_venv/bin/python" -c 'import oras.client' 2>/dev/null; then
    echo "==> installing the ORAS Python SDK (PyPI oras 0.2.43, cached in $oras_venv)"
    if ! python3 -m venv "$oras_venv" >/dev/null 2>&1; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$oras_venv"
        python3 -m venv "$oras_venv"
    fi
    "$oras_venv/bin/pip" install --quiet --disable-pip-version-check oras==0.2.43
fi
export BERTH_TEST_ORAS_PYTHON="$oras_venv/bin/python"

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

# --- brief fuzzing of the parsers ----------------------------------------------------------------
# cargo-fuzz is built once into ~/.cache/berth-tools. A crash fails the run; copy the input from
# fuzz/artifacts/<target>/ into fuzz/corpus/<target>/ and the unit test `corpus_regressions`
# keeps it as a regression test. New corpus entries go to a temporary directory.
fuzz_root=${BERTH_TOOLS:-$HOME/.cache/berth-tools}/cargo-fuzz
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$fuzz_root/bin/cargo-fuzz" ]; then
    echo "==> building cargo-fuzz (cached in $fuzz_root; first time only)"
    cargo install --locked --quiet --root "$fuzz_root" cargo-fuzz || true
fi
export PATH="$fuzz_root/bin:$PATH"
fuzz_seconds=${BERTH_FUZZ_SECONDS:-20}
# Instrumented builds of the whole tree are slow; keep them between runs.
fuzz_target_dir=${BERTH_TOOLS:-$HOME/.cache/berth-tools}/fuzz-target
if command -v cargo-fuzz >/dev/null 2>&1 \
    && RUSTC_BOOTSTRAP=1 cargo fuzz build -s none --target-dir "$fuzz_target_dir" >"$work/fuzz-build.log" 2>&1; then
    for target in manifest reference ranges; do
        echo "==> fuzzing $target for ${fuzz_seconds}s"
        mkdir -p "$work/corpus-$target"
        RUSTC_BOOTSTRAP=1 cargo fuzz run -s none --target-dir "$fuzz_target_dir" "$target" \
            "$work/corpus-$target" "fuzz/corpus/$target" \
            -- -max_total_time="$fuzz_seconds" >"$work/fuzz-$target.log" 2>&1 || {
            tail -n 30 "$work/fuzz-$target.log"
            echo "fuzzing $target found a crash (see fuzz/artifacts/$target/)"
            exit 1
        }
    done
else
    echo "==> fuzzing skipped: this toolchain cannot build the fuzz targets"
    tail -n 5 "$work/fuzz-build.log" 2>/dev/null || true
fi
