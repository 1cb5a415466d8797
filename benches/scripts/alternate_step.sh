#!/usr/bin/env bash
# The training step of gated ResNet-56 and VGG-16 and of MobileNetV2-CIFAR (gates bypassed),
# batch 128, and of gated ResNet-50 (224x224, batch 64), in dnal and in PyTorch on the same
# threads, in alternating rounds that cancel this kind of machine's drift: per round and
# network, one run of examples/profile_step per entry of ISAS (the median of its last four
# steps of six, five for ResNet-50, with DNAL_ISA set to the entry: `widest` leaves it unset),
# then the reference script's CPU step (the median of five after two warm-up steps, of three
# after one for ResNet-50, gates bypassed). Prints each round's milliseconds and PyTorch's time
# over dnal's. A network named with `-pruned` (resnet56-pruned, resnet56-thin-pruned,
# vgg16-pruned, mobilenetv2-pruned) is the network pruned to its architecture under
# benches/architectures/, as the final stage trains it, on both sides (PyTorch's through the
# reference script's `--architectures`).
#
# cargo build --release -p dnal-benches --examples
# [PYTHON=python3] [ISAS="widest none"] benches/scripts/alternate_step.sh [ROUNDS] [resnet56|vgg16|mobilenetv2|resnet50[-pruned]...]
set -euo pipefail
rounds="${1:-3}"
shift || true
nets=("$@")
[ ${#nets[@]} -gt 0 ] || nets=(resnet56 mobilenetv2)
python="${PYTHON:-python3}"
read -r -a isas <<< "${ISAS:-widest}"
step_bin="${CARGO_TARGET_DIR:-target}/release/examples/profile_step"
reference="$(dirname "$0")/../reference/pytorch_gpu_steps.py"

# The median of the last four steps profile_step prints ("forward .. backward .. total T").
dnal_ms() {
    local isa="$1" net="$2" gates=search arg="" steps=6
    case "$net" in
        resnet56) ;;
        vgg16) arg=vgg16 ;;
        mobilenetv2) gates=bypass arg=mobilenetv2 ;;
        resnet50) arg=resnet50 steps=5 ;;
        resnet56-pruned|resnet56-thin-pruned|vgg16-pruned|mobilenetv2-pruned)
            gates=bypass arg="${net%-pruned} pruned" ;;
        *) echo "network must be resnet56, vgg16, mobilenetv2 or resnet50, or one of the first three (or resnet56-thin) with -pruned, not '$net'" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086 # $arg is the network's argument, or none
    if [ "$isa" = widest ]; then
        DNAL_GATES="$gates" "$step_bin" "$steps" $arg
    else
        DNAL_ISA="$isa" DNAL_GATES="$gates" "$step_bin" "$steps" $arg
    fi | grep '^forward' | tail -n 4 | awk '{
        v = $6
        if (v ~ /ms$/) { sub("ms", "", v) } else { sub("s", "", v); v *= 1000 }
        print v }' | sort -n | awk '{ a[NR] = $1 } END { printf "%.0f", (a[2] + a[3]) / 2 }'
}

torch_ms() {
    local only="$1-cifar" steps=5 warmup=2 pruned=()
    if [ "$1" = resnet50 ]; then only=resnet50-imagenet steps=3 warmup=1; fi
    case "$1" in
        *-pruned) only=none pruned=(--architectures "${1%-pruned}-cifar10") ;;
    esac
    "$python" "$reference" --device cpu --steps "$steps" --warmup "$warmup" --only "$only" \
        "${pruned[@]}" | tail -n 1 |
        "$python" -c 'import json, sys; print("%.0f" % json.loads(sys.stdin.read())["median_ms"])'
}

for round in $(seq "$rounds"); do
    for net in "${nets[@]}"; do
        line="round $round, $net:"
        times=()
        for isa in "${isas[@]}"; do
            ms=$(dnal_ms "$isa" "$net")
            times+=("$ms")
            line="$line dnal ($isa) $ms ms,"
        done
        torch=$(torch_ms "$net")
        line="$line PyTorch $torch ms;"
        for ms in "${times[@]}"; do
            line="$line $(awk -v t="$torch" -v d="$ms" 'BEGIN { printf "%.2fx", t / d }')"
        done
        echo "$line"
    done
done
