#!/usr/bin/env bash
# The simulator runner (DESIGN.md §8). Builds keel-sim in release mode with
# --cfg madsim into target-sim, then passes the arguments on:
#
#   scripts/sim.sh run --seed N [--history FILE] [--trace]
#   scripts/sim.sh replay --seed N --trace
#   scripts/sim.sh sweep --seeds A..B [--jobs J]
#   scripts/sim.sh check-determinism --seed N
set -euo pipefail
cd "$(dirname "$0")/.."
#
# SIM_PROFILE=dev uses the debug build; SIM_PROFILE=sim an optimised build
# with debug assertions and overflow checks (what scripts/test.sh sweeps
# with); the default is release.
export RUSTFLAGS="--cfg madsim" RUSTDOCFLAGS="--cfg madsim" CARGO_TARGET_DIR=target-sim
profile=${SIM_PROFILE:-release}
case "$profile" in
    release) dir=release ;;
    dev) dir=debug ;;
    sim) dir=sim ;;
    *) echo "error: SIM_PROFILE must be release, sim or dev, not $profile" >&2; exit 2 ;;
esac
cargo build --profile "$profile" --locked -p keel-sim --bin keel-sim >&2
exec "target-sim/$dir/keel-sim" "$@"
