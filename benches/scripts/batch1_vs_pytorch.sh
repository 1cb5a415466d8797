#!/usr/bin/env bash
# Batch-1 latency of every benchmarked network, dense and pruned, in dnal (frozen and burn's
# forward) and in PyTorch eager on the same threads, in alternating rounds: per round, the
# reference script's inference half (median of 100 forwards), then one run of
# examples/profile_infer per network, kind and engine (median of the last 100 of 200 forwards).
# Prints each round's milliseconds and PyTorch's time over dnal's.
#
# cargo build --release -p dnal-benches --examples
# [PYTHON=python3] [STAT=median|min] benches/scripts/batch1_vs_pytorch.sh [ROUNDS]
set -euo pipefail
rounds="${1:-3}"
python="${PYTHON:-python3}"
# shellcheck source=benches/scripts/forward_ms.sh
source "$(dirname "$0")/forward_ms.sh"
reference="$(dirname "$0")/../reference/pytorch_reference.py"

for round in $(seq "$rounds"); do
    echo "round $round, $(date -u +%H:%M) UTC"
    torch_json=$(mktemp)
    "$python" "$reference" --only inference --reps 100 --json "$torch_json" > /dev/null
    for net in resnet56 resnet56-thin vgg16 mobilenetv2 mnist-cnn; do
        for kind in dense pruned; do
            torch_ms=$("$python" -c 'import json, sys
_, path, net, kind = sys.argv
seconds = json.load(open(path))["results"][net]["infer_" + kind + "_b1_s"]
print("%.3f" % (seconds * 1e3))' "$torch_json" "$net" "$kind")
            frozen=$(forward_ms "$net" "$kind" 1 200 frozen)
            burn=$(forward_ms "$net" "$kind" 1 200 burn)
            awk -v n="$net $kind" -v t="$torch_ms" -v f="$frozen" -v b="$burn" 'BEGIN {
                printf "  %-22s PyTorch %7.3f ms, frozen %7.3f ms (%.2fx), burn %7.3f ms (%.2fx)\n",
                    n, t, f, t / f, b, t / b }'
        done
    done
    rm -f "$torch_json"
done
