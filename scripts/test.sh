#!/usr/bin/env bash
# The one test command (README "Quick start"). Runs every check CI runs:
# formatting, clippy and the test suite in the normal build, then the same
# in the simulator build (--cfg madsim, its own target directory).
# Installs what it needs (rustfmt, clippy) on a fresh machine with rustup.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install a Rust toolchain (rustup) and re-run scripts/test.sh" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    installed=$(rustup component list --installed 2>/dev/null || true)
    for component in rustfmt clippy; do
        if ! grep -q "^${component}" <<<"$installed"; then
            step "installing $component"
            rustup component add "$component"
        fi
    done
fi

step "format check"
cargo fmt --all -- --check

step "clippy (normal build)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (normal build)"
cargo test --workspace --locked

# The simulator build swaps tokio for madsim and drops quinn/rustls/rcgen.
# Cargo reads the cfg from RUSTFLAGS (not --config), so set the variables.
export RUSTFLAGS="--cfg madsim" RUSTDOCFLAGS="--cfg madsim" CARGO_TARGET_DIR=target-sim

step "clippy (simulator build)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (simulator build)"
cargo test --workspace --locked

# The simulator: regression seeds, a sweep, and determinism across processes,
# in an optimised build that keeps debug assertions and overflow checks
# (Cargo.toml's `sim` profile): thousands of seeds in minutes on 2 cores.
export SIM_PROFILE=sim
step "simulator regression seeds"
grep -v '^#' sim/regression-seeds.txt | while read -r seed _; do
    scripts/sim.sh run --seed "$seed" | tail -n 2
done

step "simulator sweep (seeds 0..${SIM_SEEDS:=3000})"
scripts/sim.sh sweep --seeds "0..$SIM_SEEDS" --jobs 2

step "simulator determinism (5 seeds, two processes each)"
for seed in 11 222 3333 44444 555555; do
    scripts/sim.sh check-determinism --seed "$seed"
done

step "all checks passed"
