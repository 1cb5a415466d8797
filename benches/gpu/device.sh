#!/usr/bin/env bash
# On the GPU machine, from the repository root with the .gpu/ folder of benches/gpu/pack.sh:
# installs the Vulkan loader where the machine has none, unpacks the binary, runs
# benches/gpu/run.sh, and gathers its table and check in ${OUT:-gpu-out}/, with the JSON lines
# and the other logs in logs.tar.gz (the training data and checkpoints stay out of it): at
# most eight files, with the environment's parts below.
#
# CubeCL's environment (autotune results and compiled kernels of a `persistence` build, kept in
# target/environment of the folder a run starts in) travels both ways, one archive per card
# model: .gpu/cubecl-environment-MODEL.tar.gz.part* (MODEL as nvidia-smi names the card, e.g.
# NVIDIA-H200; the parts, of at most 15 MiB, concatenated are the archive) from an earlier run
# seed it, and the environment after the run comes back as such parts in the results; put them
# in .gpu/ for the next run (pack.sh keeps them when it packs a new binary). Per model,
# because CubeCL files autotune results under the runtime and the device's index, not the
# card: another card's picks would be taken as this one's. build.txt (what .gpu/BUILD says)
# is in logs.tar.gz.
#
# Usage: benches/gpu/device.sh ; BUDGET_S, BACKENDS, NETS, REF_DEVICE, TRAIN_BACKEND as run.sh.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
RESULTS=${OUT:-gpu-out}
WORK=${WORK:-/tmp/dnal-gpu}
mkdir -p "$RESULTS" "$WORK"
cat .gpu/BUILD 2>/dev/null

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
parts=(.gpu/"$env_name".part*)
if [[ -f ${parts[0]} && ! -e target/environment ]]; then
    mkdir -p target
    if cat "${parts[@]}" | tar -xz -C target environment; then
        echo "device.sh: CubeCL environment seeded from .gpu/$env_name.part* ($(du -sh target/environment | cut -f1))"
    else
        echo "device.sh: .gpu/$env_name.part* could not be unpacked; starting with an empty CubeCL environment" >&2
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
cp .gpu/BUILD "$WORK/results/build.txt" 2>/dev/null
cp "$WORK/results/table.md" "$WORK/results"/check-*.txt "$RESULTS/" 2>/dev/null
tar -czf "$RESULTS/logs.tar.gz" -C "$WORK/results" --exclude=cifar --exclude=run \
    . 2>/dev/null
[[ -d $WORK/results/run ]] && tar -czf "$RESULTS/train-run.tar.gz" -C "$WORK/results/run" \
    --exclude='*.bpk' --exclude='*.onnx' --exclude='*.safetensors' . 2>/dev/null
if [[ -d target/environment ]]; then
    # A result file may hold 16 MiB: the archive comes back in parts of 15.
    tar -czf "$WORK/$env_name" -C target environment &&
        split -b 15M -d -a 1 "$WORK/$env_name" "$RESULTS/$env_name.part"
fi
ls -l "$RESULTS"
