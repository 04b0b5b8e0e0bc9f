#!/usr/bin/env bash
# keel next to etcd, measured by the same load driver (src/cli/bench/load.rs):
# closed-loop throughput and exact p50/p99/p999 latency of replicated writes,
# linearizable reads and metadata commits at several client counts, first on
# a fresh local 3-node keel cluster (`keel bench`), then on a fresh local
# 3-member etcd cluster with default settings, fsync on (bench/etcd,
# `keel-etcd-bench`), and prints both side by side.
#
# NOT part of CI: it takes minutes, installs etcd, and its figures depend on
# the machine and whatever else runs on it.
#
# Usage: scripts/bench.sh [--all] [--duration D] [--clients N,N,..] [--ops O,O,..] [KEEL-BENCH-ARGS...]
#   DURATION  each load run's measured time (default 10s; plus a fifth of it warm-up)
#   CLIENTS   client counts (default 1,16,64,256)
#   OPS       what to measure (default write,read,meta)
#   --duration/--clients/--ops override these and go to both systems; other
#   arguments go to `keel bench` only (e.g. --moves 5 --failovers 3).
#   --all     also run `cargo bench --bench commit` and `--bench core`.
# Results: target/bench/{keel,etcd}.{json,txt} and target/bench/compare.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${DURATION:-10s}
clients=${CLIENTS:-1,16,64,256}
ops=${OPS:-write,read,meta}
all=0
keel_args=()
while (($#)); do
    case $1 in
        --all) all=1 ;;
        --duration | --clients | --ops)
            [[ $# -ge 2 ]] || { echo "bench.sh: $1 needs a value" >&2; exit 2; }
            case $1 in
                --duration) duration=$2 ;;
                --clients) clients=$2 ;;
                --ops) ops=$2 ;;
            esac
            shift ;;
        --duration=*) duration=${1#*=} ;;
        --clients=*) clients=${1#*=} ;;
        --ops=*) ops=${1#*=} ;;
        *) keel_args+=("$1") ;;
    esac
    shift
done

# etcd to measure, and protoc for the etcd-client crate's build script.
apt_install() {
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    echo "bench.sh: installing $* (apt-get)"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@"
}
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"

cargo build --release
cargo build --release --manifest-path bench/etcd/Cargo.toml

out=target/bench
mkdir -p "$out"
common=(--duration "$duration" --clients "$clients" --ops "$ops")
echo "== keel (${common[*]}) =="
target/release/keel bench "${common[@]}" --json "$out/keel.json" ${keel_args[@]+"${keel_args[@]}"} |
    tee "$out/keel.txt"
echo
echo "== etcd (${common[*]}) =="
bench/etcd/target/release/keel-etcd-bench "${common[@]}" \
    --json "$out/etcd.json" --compare "$out/keel.json" | tee "$out/etcd.txt"
# The comparison is the etcd run's last table.
awk '/^op .*keel ops\/s/ { found = 1 } found' "$out/etcd.txt" >"$out/compare.txt"

if ((all)); then
    echo
    echo "== cargo bench =="
    cargo bench --bench commit 2>&1 | tee "$out/cargo-bench-commit.txt"
    cargo bench --bench core 2>&1 | tee "$out/cargo-bench-core.txt"
fi
echo
echo "bench.sh: results in $out/"
