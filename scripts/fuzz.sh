#!/usr/bin/env bash
# Runs one of keel's cargo-fuzz targets (fuzz/, issue 7):
#
#   scripts/fuzz.sh TARGET SECONDS   fuzz TARGET for SECONDS seconds
#   scripts/fuzz.sh list             list the targets
#
# The fuzzer starts from the checked-in seeds (fuzz/corpus/TARGET) and the
# known crashes (fuzz/regressions/TARGET), but writes the inputs it finds
# interesting to a scratch corpus (fuzz/scratch/TARGET, gitignored), so a
# run never changes checked-in files. A crash stops the run with a non-zero
# exit and the path of the crashing input; minimise it with
# `cargo +nightly fuzz tmin TARGET PATH`, then add it under
# fuzz/regressions/TARGET/ so that `cargo test --test fuzz_corpora` keeps
# replaying it.
#
# Needs a nightly toolchain (rustup toolchain install nightly) and installs
# cargo-fuzz if it is missing. Extra libFuzzer flags may follow SECONDS.
# A run uses one core; on a shared machine run it under `nice -n 19`.
# sim_disk_recovery tolerates panics raised inside redb on corrupted images
# (a known redb limitation, see fuzz/targets/sim_disk_recovery.rs); set
# KEEL_FUZZ_STRICT_REDB=1 to treat them as crashes.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

usage() {
    echo "usage: scripts/fuzz.sh TARGET SECONDS [LIBFUZZER_FLAGS...] | scripts/fuzz.sh list" >&2
    exit 2
}

targets() {
    for file in fuzz_targets/*.rs; do
        basename "$file" .rs
    done
}

[ $# -ge 1 ] || usage
if [ "$1" = list ]; then
    targets
    exit 0
fi
[ $# -ge 2 ] || usage
target=$1 seconds=$2
shift 2
# (Not `grep -q`: with pipefail, its early exit would fail the pipeline.)
if ! targets | grep -x "$target" >/dev/null; then
    echo "error: no fuzz target named '$target'; the targets are:" >&2
    targets | sed 's/^/  /' >&2
    exit 2
fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "error: SECONDS must be a positive whole number, not '$seconds'" >&2
    exit 2
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "error: cargo-fuzz needs a nightly toolchain; install it with 'rustup toolchain install nightly'" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

seeds=corpus/$target
regressions=regressions/$target
scratch=scratch/$target
artifacts=artifacts/$target
mkdir -p "$scratch" "$artifacts"
# The first corpus directory is where libFuzzer writes new inputs; the
# checked-in ones after it are only read.
corpora=("$scratch" "$seeds")
if [ -d "$regressions" ]; then
    corpora+=("$regressions")
fi

log=$(mktemp "${TMPDIR:-/tmp}/keel-fuzz-$target.XXXXXX")
echo "==> fuzzing $target for ${seconds}s (new inputs: fuzz/$scratch, log: $log)"
status=0
cargo +nightly fuzz run "$target" "${corpora[@]}" -- \
    -max_total_time="$seconds" \
    -artifact_prefix="$artifacts/" \
    -print_final_stats=1 \
    "$@" 2>&1 | tee "$log" || status=${PIPESTATUS[0]}

# libFuzzer's final statistics: how much was tried.
grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs)' "$log" || true
if [ "$status" -ne 0 ]; then
    crash=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -n 1 | sed 's/Test unit written to //')
    echo "error: fuzz target '$target' failed (exit $status)" >&2
    if [ -n "$crash" ]; then
        echo "crash input: fuzz/$crash" >&2
        echo "reproduce:   cd fuzz && cargo +nightly fuzz run $target $crash" >&2
    fi
    exit "$status"
fi
echo "==> $target: no crash in ${seconds}s"
