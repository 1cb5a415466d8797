#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, without building anything: the training step of gated
# ResNet-56, VGG-16 and MobileNetV2 (CIFAR shapes, batch 128) and ResNet-50 (224x224, batch 64)
# on dnal's cuda and wgpu backends and in PyTorch eager on the same card, a short `dnal-train
# train` run on CIFAR-shaped data in the official binary format, and one table.
#
# Build (x86-64) and carry the binary and this folder:
#   cargo build --release -p dnal-train --features cuda,wgpu
#   cp $CARGO_TARGET_DIR/release/dnal-train .
# The cuda feature's build wants an LLVM (burn's CUDA backend links cubecl-llvm), which it
# downloads from GitHub into ~/.local/share/tracel/; where only package registries are reachable,
# run benches/gpu/llvm-from-pypi.sh first. Stripped (`strip dnal-train`) the binary is about
# 190 MB.
# Needs on the GPU machine: the NVIDIA driver (burn's cuda backend compiles its kernels to PTX
# with the LLVM linked into the binary, and the driver loads them), the Vulkan loader
# (libvulkan1) for wgpu, and python3 with torch and torchvision for the reference.
#
# Usage: benches/gpu/run.sh [DNAL_TRAIN_BINARY] ; figures go to ${OUT:-gpu-results}/.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-./dnal-train}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"

NETS=("resnet56-cifar 128 32 10" "vgg16-cifar 128 32 10" "mobilenetv2-cifar 128 32 10"
      "resnet50-imagenet 64 224 1000")
for backend in cuda wgpu; do
    for net in "${NETS[@]}"; do
        read -r model batch size classes <<< "$net"
        echo "dnal $backend $model" >&2
        if ! timeout 300 "$BIN" bench --backend "$backend" --model "$model" --batch "$batch" \
                --size "$size" --classes "$classes" --warmup 3 --steps 10 --json \
                >> "$OUT/steps.jsonl" 2> "$OUT/$backend-$model.err"; then
            echo "  failed: $(tail -n 3 "$OUT/$backend-$model.err")" >&2
        fi
    done
done

echo "pytorch eager" >&2
timeout 600 python3 benches/reference/pytorch_gpu_steps.py --device cuda >> "$OUT/steps.jsonl" \
    || echo "  pytorch reference failed" >&2

echo "short training run (cuda, CIFAR-shaped random data)" >&2
python3 benches/gpu/make_cifar_bin.py "$OUT/cifar" --per-batch 2000 >&2
start=$(date +%s)
timeout 900 "$BIN" train --preset resnet56-cifar10-l1e-4 --backend cuda --quiet \
    --set data.path="$OUT/cifar" --set weights.epochs=1 --set arch.epochs=1 \
    --set final.epochs=1 --out "$OUT/run" > "$OUT/train.log" 2>&1
status=$?
echo "train: exit $status after $(( $(date +%s) - start )) s (10,000 images, 1 + 1 + 1 epochs; $OUT/train.log)" \
    | tee "$OUT/train.txt"

echo
cat "$OUT/card.txt"
python3 benches/gpu/table.py "$OUT/steps.jsonl"
cat "$OUT/train.txt"
