#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, without building anything: the training step of gated
# ResNet-56, VGG-16 and MobileNetV2 (CIFAR shapes, batch 128) and ResNet-50 (224x224, batch 64)
# on dnal's cuda and wgpu backends and in PyTorch eager on the same card, a short `dnal-train
# train` run on CIFAR-shaped data in the official binary format, and one table.
#
# Build (x86-64) and carry the binary and this folder:
#   cargo build --release -p dnal-train --features cuda,wgpu
#   benches/gpu/pack.sh    # stripped + compressed binary and the Vulkan loader, in .gpu/
# The cuda feature's build wants an LLVM (burn's CUDA backend links cubecl-llvm), which it
# downloads from GitHub into ~/.local/share/tracel/; where only package registries are reachable,
# run benches/gpu/llvm-from-pypi.sh first. On the GPU machine, benches/gpu/device.sh unpacks
# .gpu/ and runs this script.
# Needs on the GPU machine: the NVIDIA driver (burn's cuda backend compiles its kernels to PTX
# with the LLVM linked into the binary, and the driver loads them), the Vulkan loader
# (libvulkan1) for wgpu, and python3 with torch and torchvision for the reference.
#
# Usage: benches/gpu/run.sh [DNAL_TRAIN_BINARY]; figures go to ${OUT:-gpu-results}/.
# The whole script keeps within BUDGET_S seconds (default 540): the parts run in order of
# importance (the kernel check and dnal's steps on cuda, PyTorch's on the same networks, the
# variants below, the training run, dnal on wgpu), each under its own cap and what is left of
# the budget; a part with under 20 s left is recorded as skipped, and so are a backend's other
# networks once one of them times out.
# Also settable: BACKENDS (default "cuda wgpu"), NETS (default all four), REF_DEVICE (PyTorch's
# device, default cuda; "none" skips it), TRAIN_BACKEND (default cuda; "none" skips the run),
# TRAIN_IMAGES and TEST_IMAGES (how many of the 50,000 + 10,000 written the run uses, default
# 10000 and 2000), TRAIN_ARGS (more arguments for the run, e.g. "--graph": the weight and final
# stages' steps recorded once per epoch and replayed), STEP_CAP_S (seconds a dnal network may take, default 120), REF_ARGS (more
# arguments for the PyTorch reference, e.g. "--no-tf32"), PROFILE (a network: after the first
# backend's steps, that network runs 3 + 3 more steps on that backend with CubeCL's profiling
# log, benches/gpu/cubecl-profile.toml, written to $OUT/profile-BACKEND-NETWORK.log),
# BURN_OPS_NETS (networks whose step runs again on the first backend with `--burn-ops`: dnal's
# own kernels off, burn's operations throughout; a column of its own in the table),
# BURN_SGD_NETS (likewise with `--burn-sgd`: burn's SGD, seven operations per parameter, in
# place of dnal's one operation for all of them), SEPARATE_FINISH_NETS (likewise with
# `--reduction-finish=separate`: BatchNorm's reductions finished by a second launch each, as
# before they were folded into the launch that makes their partial sums), GRAPH_NETS (likewise
# with `--graph`: the step recorded once as a CUDA graph and replayed, the host's per-launch work
# gone), SEARCH_NETS (likewise with `--search --penalty=1e-4`: the architecture stage's step,
# gates searching and the paper's sparsity penalty in the loss; rows of their own), ARCHITECTURES (checked-in architectures under benches/architectures/, e.g.
# "resnet56-cifar10 mobilenetv2-cifar10": after the dense steps, each pruned network's step on
# the first backend and in PyTorch, the final stage's step; default none), CHECK
# (default 1: first `dnal-train check` on the first backend, dnal's kernels against flex and
# training steps replayed from a recorded graph against plain ones, in $OUT/check-BACKEND.txt;
# 0 skips it), CHECK_ONLY (one family for the check: batch-norm, depthwise, convolution, sgd,
# penalty, loss, channels, gates or graph; default all nine), CHECK_CAP_S (seconds the check
# may take, default 180; it prints family by family, so a check cut short keeps what it found).
# With BACKENDS=flex REF_DEVICE=cpu TRAIN_BACKEND=flex the script runs on any machine.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
BIN=${1:-./dnal-train}
OUT=${OUT:-gpu-results}
BUDGET_S=${BUDGET_S:-540}
BACKENDS=${BACKENDS:-cuda wgpu}
NETS=${NETS:-resnet56-cifar vgg16-cifar mobilenetv2-cifar resnet50-imagenet}
REF_DEVICE=${REF_DEVICE:-cuda}
TRAIN_BACKEND=${TRAIN_BACKEND:-cuda}
TRAIN_IMAGES=${TRAIN_IMAGES:-10000}
TEST_IMAGES=${TEST_IMAGES:-2000}
TRAIN_ARGS=${TRAIN_ARGS:-}
STEP_CAP_S=${STEP_CAP_S:-120}
REF_ARGS=${REF_ARGS:-}
PROFILE=${PROFILE:-}
BURN_OPS_NETS=${BURN_OPS_NETS:-}
BURN_SGD_NETS=${BURN_SGD_NETS:-}
SEPARATE_FINISH_NETS=${SEPARATE_FINISH_NETS:-}
GRAPH_NETS=${GRAPH_NETS:-}
SEARCH_NETS=${SEARCH_NETS:-}
ARCHITECTURES=${ARCHITECTURES:-}
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"
deadline=$(( $(date +%s) + BUDGET_S ))

# Seconds a part may take: its cap, or what is left of the budget; 0 when under 20 s are left.
allowance() {
    local left=$(( deadline - $(date +%s) ))
    (( left < 20 )) && { echo 0; return; }
    echo $(( left < $1 ? left : $1 ))
}

# The network's batch, image side and classes.
shape_of() {
    case $1 in
        resnet50-imagenet) echo "64 224 1000" ;;
        *) echo "128 32 10" ;;
    esac
}

# The network a checked-in architecture prunes, as `model:architecture` (dnal_steps' entry).
pruned_entry() {
    case $1 in
        resnet56*) echo "resnet56-cifar:$1" ;;
        vgg16*) echo "vgg16-cifar:$1" ;;
        mobilenetv2*) echo "mobilenetv2-cifar:$1" ;;
        *) echo "unknown-network:$1" ;;
    esac
}

# A table row for a step that gave no figure: `failed`, `timeout` or `skipped`.
# no_figure BACKEND MODEL REASON [ARCHITECTURE] [PENALTY: the searching step's lambda]
no_figure() {
    local batch size classes arch="" search=""
    read -r batch size classes <<< "$(shape_of "$2")"
    [[ -n ${4:-} ]] && arch=",\"architecture\":\"$4\""
    [[ -n ${5:-} ]] && search=",\"gates\":\"search\",\"penalty\":$5"
    printf '{"model":"%s","backend":"%s","batch":%s,"size":%s%s%s,"error":"%s"}\n' \
        "$2" "$1" "$batch" "$size" "$arch" "$search" "$3" >> "$OUT/steps.jsonl"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "no NVIDIA GPU visible (nvidia-smi failed)"; } | tee "$OUT/card.txt"
"$BIN" backends 2>/dev/null | tee "$OUT/backends.txt"

# After a network times out on a backend, the rest of that backend's networks are skipped:
# a step that slow means compilation or autotuning is stuck, and the budget is worth more to
# the parts after it.
# dnal_steps BACKEND [NETWORKS [EXTRA_ARGUMENT]]; a network `model:architecture` is the model
# pruned to benches/architectures/ARCHITECTURE.json.
dnal_steps() {
    local backend=$1 nets=${2:-$NETS} extra=${3:-} entry model arch name batch size classes cap stuck=0
    # The label `dnal-train bench` gives the backend with that argument.
    local label=$backend penalty=""
    case $extra in
        --burn-ops) label+=" (burn ops)" ;;
        --burn-sgd) label+=" (burn sgd)" ;;
        --reduction-finish=*) label+=" (${extra#*=} finish)" ;;
        --graph) label+=" (graph)" ;;
        --search*) penalty=${extra##*--penalty=} ;;
    esac
    for entry in $nets; do
        model=${entry%%:*} arch="" name=$entry
        local pruned=()
        if [[ $entry == *:* ]]; then
            arch=${entry#*:} name=$model-$arch
            pruned=(--architecture "benches/architectures/$arch.json")
        fi
        read -r batch size classes <<< "$(shape_of "$model")"
        cap=$(allowance "$STEP_CAP_S")
        if (( cap == 0 || stuck )); then
            no_figure "$label" "$model" skipped "$arch" "$penalty"
            continue
        fi
        echo "dnal $label $name (up to $cap s)" >&2
        # shellcheck disable=SC2086 # $extra holds its arguments, or none
        timeout "$cap" "$BIN" bench --backend "$backend" --model "$model" --batch "$batch" \
            --size "$size" --classes "$classes" --warmup 3 --steps 10 --json $extra \
            "${pruned[@]}" >> "$OUT/steps.jsonl" 2> "$OUT/$backend${extra// /}-$name.err"
        case $? in
            0) ;;
            124) no_figure "$label" "$model" timeout "$arch" "$penalty"; stuck=1
                 echo "  timed out after $cap s; skipping $label's other networks" >&2 ;;
            *) no_figure "$label" "$model" failed "$arch" "$penalty"
               echo "  failed: $(tail -n 3 "$OUT/$backend${extra// /}-$name.err")" >&2 ;;
        esac
    done
}

reference() {
    [[ $REF_DEVICE == none ]] && return
    local cap; cap=$(allowance 180)
    if (( cap == 0 )); then
        for model in $NETS; do no_figure "pytorch-$REF_DEVICE" "$model" skipped; done
        return
    fi
    echo "pytorch eager on $REF_DEVICE (up to $cap s)" >&2
    local pruned=()
    [[ -n $ARCHITECTURES ]] && pruned=(--architectures "$(tr ' ' ',' <<< "$ARCHITECTURES")")
    # shellcheck disable=SC2086 # REF_ARGS holds several arguments
    timeout "$cap" python3 benches/reference/pytorch_gpu_steps.py --device "$REF_DEVICE" \
        --only "$(tr ' ' ',' <<< "$NETS")" "${pruned[@]}" $REF_ARGS >> "$OUT/steps.jsonl" \
        2> "$OUT/pytorch.err" \
        || echo "  pytorch reference failed or timed out: $(tail -n 3 "$OUT/pytorch.err")" >&2
}

training_run() {
    [[ $TRAIN_BACKEND == none ]] && return
    local cap; cap=$(allowance 240)
    if (( cap == 0 )); then
        echo "train: skipped (budget)" | tee "$OUT/train.txt"
        return
    fi
    echo "short training run ($TRAIN_BACKEND, CIFAR-shaped random data, up to $cap s)" >&2
    [[ -f $OUT/cifar/cifar-10-batches-bin/test_batch.bin ]] \
        || python3 benches/gpu/make_cifar_bin.py "$OUT/cifar" >&2
    rm -rf "$OUT/run"
    local start status; start=$(date +%s)
    # shellcheck disable=SC2086 # $TRAIN_ARGS holds its arguments, or none
    timeout "$cap" "$BIN" train --preset resnet56-cifar10-l1e-4 --backend "$TRAIN_BACKEND" \
        --quiet --set data.path="$OUT/cifar" --set weights.epochs=1 --set arch.epochs=1 \
        --set final.epochs=1 --set data.train_limit="$TRAIN_IMAGES" \
        --set data.test_limit="$TEST_IMAGES" --out "$OUT/run" $TRAIN_ARGS > "$OUT/train.log" 2>&1
    status=$?
    echo "train on $TRAIN_BACKEND${TRAIN_ARGS:+ $TRAIN_ARGS}: exit $status after $(( $(date +%s) - start )) s ($TRAIN_IMAGES training images, $TEST_IMAGES test images, 1 + 1 + 1 epochs; $OUT/train.log)" \
        | tee "$OUT/train.txt"
}

# $PROFILE's step on backend $1 again (3 warm-up and 3 timed steps), started where CubeCL finds
# the profiling settings; its figures stay out of the table (profiling slows the steps).
profiled_step() {
    [[ -z $PROFILE ]] && return
    local backend=$1 batch size classes cap dir log
    read -r batch size classes <<< "$(shape_of "$PROFILE")"
    cap=$(allowance "$STEP_CAP_S")
    log="$OUT/profile-$backend-$PROFILE.log"
    if (( cap == 0 )); then
        echo "profile: skipped (budget)" | tee "$log"
        return
    fi
    echo "dnal $backend $PROFILE with CubeCL's profiling log (up to $cap s)" >&2
    dir=$(mktemp -d)
    cp benches/gpu/cubecl-profile.toml "$dir/cubecl.toml"
    # The checkout's CubeCL environment, so that the profiled process finds what the timed
    # steps tuned and compiled: from a folder outside any Cargo workspace CubeCL would open
    # the user's cache and tune everything again.
    printf '\n[environment]\npath = { directory = "%s" }\n' "$PWD/target/environment" \
        >> "$dir/cubecl.toml"
    (cd "$dir" && timeout "$cap" "$bin_abs" bench --backend "$backend" --model "$PROFILE" \
        --batch "$batch" --size "$size" --classes "$classes" --warmup 3 --steps 3) \
        > "$OUT/profile-$backend-$PROFILE.out" 2>&1 \
        || echo "  profiled step: exit $?" >&2
    if [[ -f $dir/cubecl-profile.log ]]; then
        mv "$dir/cubecl-profile.log" "$log"
    else
        echo "no profiling log (the backend is not a CubeCL one, or the step did not start)" > "$log"
    fi
    rm -rf "$dir"
}

# dnal's own kernels on backend $1 against flex and its recorded steps against plain ones
# (`dnal-train check`): every quantity and a summary line, in $OUT/check-BACKEND.txt (CHECK=0
# skips it).
kernel_check() {
    [[ ${CHECK:-1} == 0 ]] && return
    local cap; cap=$(allowance "${CHECK_CAP_S:-180}")
    (( cap == 0 )) && return
    echo "dnal $1 kernels against flex (up to $cap s)" >&2
    local only=()
    [[ -n ${CHECK_ONLY:-} ]] && only=(--only "$CHECK_ONLY")
    # Every quantity, printed family by family: a check stopped by its cap keeps what it found.
    timeout "$cap" "$BIN" check --backend "$1" "${only[@]}" > "$OUT/check-$1.txt" 2>&1
    echo "  check on $1: exit $?; $(grep -c '^FAIL' "$OUT/check-$1.txt") failing; $(tail -n 1 "$OUT/check-$1.txt")" >&2
}

bin_abs=$(realpath "$BIN")
read -r -a backend_list <<< "$BACKENDS"
for b in "${backend_list[@]:0:1}"; do
    kernel_check "$b"
    dnal_steps "$b"
    # The comparison the figures are for comes before the variants.
    reference
    [[ -n $BURN_OPS_NETS ]] && dnal_steps "$b" "$BURN_OPS_NETS" --burn-ops
    [[ -n $BURN_SGD_NETS ]] && dnal_steps "$b" "$BURN_SGD_NETS" --burn-sgd
    [[ -n $SEPARATE_FINISH_NETS ]] \
        && dnal_steps "$b" "$SEPARATE_FINISH_NETS" --reduction-finish=separate
    [[ -n $GRAPH_NETS ]] && dnal_steps "$b" "$GRAPH_NETS" --graph
    [[ -n $SEARCH_NETS ]] && dnal_steps "$b" "$SEARCH_NETS" "--search --penalty=1e-4"
    if [[ -n $ARCHITECTURES ]]; then
        entries=""
        for a in $ARCHITECTURES; do entries+=" $(pruned_entry "$a")"; done
        dnal_steps "$b" "$entries"
    fi
    profiled_step "$b"
done
training_run
for b in "${backend_list[@]:1}"; do dnal_steps "$b"; done

echo
cat "$OUT/card.txt"
python3 benches/gpu/table.py "$OUT/steps.jsonl" | tee "$OUT/table.md"
[[ -f $OUT/train.txt ]] && cat "$OUT/train.txt"
exit 0
