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
# Usage: scripts/bench.sh [--all] [--duration D] [--clients N,N,..] [--ops O,O,..] [--route R] [KEEL-BENCH-ARGS...]
#   DURATION  each load run's measured time (default 10s; plus a fifth of it warm-up)
#   CLIENTS   client counts (default 1,16,64,256)
#   OPS       what to measure (default write,read,meta)
#   ROUTE     spread (default): client i to node (member) i mod 3, which
#             forwards to the leader; leader: every request goes to the
#             leader of what it addresses
#   --duration/--clients/--ops/--route override these and go to both systems; other
#   arguments go to `keel bench` only (e.g. --moves 5 --failovers 3).
#   --all     also run `cargo bench --bench commit` and `--bench core`.
#   --idle G  instead of all that: the idle cost of a 3-node cluster with G
#             data groups (CPU share and resident memory of each node over
#             30 s of no requests, from /proc; Linux only).
# Results: target/bench/{keel,etcd}.{json,txt} and target/bench/compare.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${DURATION:-10s}
clients=${CLIENTS:-1,16,64,256}
ops=${OPS:-write,read,meta}
route=${ROUTE:-spread}
all=0
idle=0
keel_args=()
while (($#)); do
    case $1 in
        --all) all=1 ;;
        --idle)
            [[ $# -ge 2 ]] || { echo "bench.sh: --idle needs a group count" >&2; exit 2; }
            idle=$2
            shift ;;
        --duration | --clients | --ops | --route)
            [[ $# -ge 2 ]] || { echo "bench.sh: $1 needs a value" >&2; exit 2; }
            case $1 in
                --duration) duration=$2 ;;
                --clients) clients=$2 ;;
                --ops) ops=$2 ;;
                --route) route=$2 ;;
            esac
            shift ;;
        --duration=*) duration=${1#*=} ;;
        --clients=*) clients=${1#*=} ;;
        --ops=*) ops=${1#*=} ;;
        --route=*) route=${1#*=} ;;
        *) keel_args+=("$1") ;;
    esac
    shift
done

# The idle cost: a cluster with `idle` data groups, left alone, sampled from
# /proc over a 30 s window after a 10 s settle.
idle_cost() {
    local groups=$1 dir
    dir=$(mktemp -d)
    cargo build --release
    target/release/keel up --nodes 3 --data-groups "$groups" --dir "$dir/cluster" \
        --base-port 7501 >"$dir/up.log" 2>&1 &
    local up=$!
    trap 'kill -INT '"$up"' 2>/dev/null; wait '"$up"' 2>/dev/null; rm -rf '"$dir" EXIT
    until grep -q "keel is up" "$dir/up.log"; do
        kill -0 "$up" 2>/dev/null || { cat "$dir/up.log" >&2; exit 1; }
        sleep 1
    done
    sleep 10
    local hz window=30 node pid before=() after=()
    hz=$(getconf CLK_TCK)
    local pids=()
    for node in 1 2 3; do pids+=("$(cat "$dir/cluster/node-$node/pid")"); done
    ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
    for pid in "${pids[@]}"; do before+=("$(ticks "$pid")"); done
    sleep "$window"
    for pid in "${pids[@]}"; do after+=("$(ticks "$pid")"); done
    echo "idle cost: 3 nodes, $groups data groups (RF 3), ${window}s window after a 10s settle"
    for i in 0 1 2; do
        pid=${pids[$i]}
        awk -v n=$((i + 1)) -v d=$((after[i] - before[i])) -v hz="$hz" -v w="$window" \
            -v rss="$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")" \
            'BEGIN { printf "node %d: CPU %.1f%% of one core, RSS %.0f MiB\n", n, 100 * d / hz / w, rss / 1024 }'
    done
}
if ((idle > 0)); then
    idle_cost "$idle"
    exit 0
fi

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
common=(--duration "$duration" --clients "$clients" --ops "$ops" --route "$route")
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
