#!/usr/bin/env bash
# On the GPU machine, from the repository root with the .gpu/ folder of benches/gpu/pack.sh:
# installs the Vulkan loader where the machine has none, unpacks the binary, runs
# benches/gpu/run.sh, and gathers its table, JSON lines and logs in ${OUT:-gpu-out}/ (the
# training data and checkpoints stay out of it).
#
# CubeCL's environment (autotune results and compiled kernels of a `persistence` build, kept in
# target/environment of the folder a run starts in) travels both ways, one archive per card
# model: .gpu/cubecl-environment-MODEL.tar.gz (MODEL as nvidia-smi names the card, e.g.
# NVIDIA-H200) from an earlier run seeds it, and the environment after the run comes back as
# cubecl-environment-MODEL.tar.gz in the results; put that in .gpu/ for the next run (pack.sh
# keeps it when it packs a new binary). Per model, because CubeCL files autotune results under
# the runtime and the device's index, not the card: another card's picks would be taken as
# this one's.
#
# Usage: benches/gpu/device.sh ; BUDGET_S, BACKENDS, NETS, REF_DEVICE, TRAIN_BACKEND as run.sh.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
RESULTS=${OUT:-gpu-out}
WORK=${WORK:-/tmp/dnal-gpu}
mkdir -p "$RESULTS" "$WORK"
{ tee "$RESULTS/build.txt" < .gpu/BUILD; } 2>/dev/null

if ! ldconfig -p | grep -q 'libvulkan.so.1 '; then
    for f in .gpu/*.deb; do [[ -e $f ]] && dpkg -x "$f" /; done
    ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[[ -z ${VK_DRIVER_FILES:-} && -f $icd ]] && export VK_DRIVER_FILES=$icd

card=no-nvidia-gpu
if names=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null) && [[ -n $names ]]; then
    card=$(head -n 1 <<< "$names" | tr -cs 'A-Za-z0-9._\n' '-' | sed 's/-$//')
fi
env_name=cubecl-environment-$card.tar.gz
if [[ -f .gpu/$env_name && ! -e target/environment ]]; then
    mkdir -p target
    if tar -xzf ".gpu/$env_name" -C target environment; then
        echo "device.sh: CubeCL environment seeded from .gpu/$env_name ($(du -sh target/environment | cut -f1))"
    else
        echo "device.sh: .gpu/$env_name could not be unpacked; starting with an empty CubeCL environment" >&2
        rm -rf target/environment
    fi
fi

bin=$WORK/dnal-train
if ! xz -dc .gpu/dnal-train.xz > "$bin" 2>/dev/null; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        .gpu/dnal-train.xz "$bin" || { echo "device.sh: cannot unpack .gpu/dnal-train.xz" >&2; exit 1; }
fi
chmod +x "$bin"

OUT=$WORK/results benches/gpu/run.sh "$bin" 2>&1 | tee "$RESULTS/run.log"
cp "$WORK/results/table.md" "$WORK/results/steps.jsonl" "$WORK/results"/check-*.txt "$RESULTS/" 2>/dev/null
tar -czf "$RESULTS/logs.tar.gz" -C "$WORK/results" --exclude=cifar --exclude=run \
    . 2>/dev/null
[[ -d $WORK/results/run ]] && tar -czf "$RESULTS/train-run.tar.gz" -C "$WORK/results/run" \
    --exclude='*.bpk' --exclude='*.onnx' --exclude='*.safetensors' . 2>/dev/null
if [[ -d target/environment ]]; then
    tar -czf "$RESULTS/$env_name" -C target environment
    size=$(stat -c %s "$RESULTS/$env_name")
    (( size > 16 * 1024 * 1024 )) &&
        echo "device.sh: $env_name holds $((size >> 20)) MiB, more than a result file may" >&2
fi
ls -l "$RESULTS"
