#!/usr/bin/env bash
# Pruned speed-up over MACs reduction from alternating runs, which cancel this kind of
# machine's drift better than one criterion run: for each network and batch, ROUNDS rounds of
# one dense and one pruned run of examples/profile_infer, each the median of its forwards after
# a warm-up (STAT=min: their minimum, the time of a forward nothing else disturbed); prints the
# per-round ratios and their median. ENGINE=frozen times the networks frozen for inference
# (`dnal_zoo::FrozenNetwork`) instead of burn's forward.
#
# cargo build --release -p dnal-benches --examples
# [STAT=median|min] [ENGINE=burn|frozen] benches/scripts/alternate_infer.sh [ROUNDS] [NETWORK...]
set -euo pipefail
rounds="${1:-5}"
engine="${ENGINE:-burn}"
case "$engine" in burn | frozen) ;; *) echo "ENGINE must be burn or frozen, not '$engine'" >&2; exit 2 ;; esac
# shellcheck source=benches/scripts/forward_ms.sh
source "$(dirname "$0")/forward_ms.sh"
shift || true
nets=("$@")
[ ${#nets[@]} -gt 0 ] || nets=(mnist-cnn resnet56 resnet56-thin vgg16 mobilenetv2)
declare -A reduction=([mnist-cnn]=4.29 [resnet56]=3.39 [resnet56-thin]=7.23 [vgg16]=1.90 [mobilenetv2]=2.50)

for net in "${nets[@]}"; do
    for batch in 1 64; do
        if [ "$batch" = 1 ]; then n=200; else n=12; fi
        ratios=()
        for _ in $(seq "$rounds"); do
            dense=$(forward_ms "$net" dense "$batch" "$n" "$engine")
            pruned=$(forward_ms "$net" pruned "$batch" "$n" "$engine")
            ratios+=("$(awk -v d="$dense" -v p="$pruned" -v r="${reduction[$net]}" \
                'BEGIN { printf "%.2f", d / p / r }')")
        done
        median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
        echo "$engine $net batch $batch (${reduction[$net]}x fewer MACs): ${ratios[*]} -> median $median"
    done
done
