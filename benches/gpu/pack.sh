#!/usr/bin/env bash
# Packs what benches/gpu/device.sh needs on a GPU machine that reaches no package registry into
# .gpu/ (git-ignored): the dnal-train binary, stripped and compressed with xz, and the Debian
# packages of the Vulkan loader (libvulkan1 and the GL/EGL dispatch libraries beside it), which
# wgpu opens at run time. The cubecl-environment-*.tar.gz.part* already in .gpu/ are kept.
#
# Usage: benches/gpu/pack.sh [DNAL_TRAIN_BINARY]
#   default binary: ${CARGO_TARGET_DIR:-target}/release/dnal-train, built with
#   `cargo build --release -p dnal-train --features cuda,wgpu`. A binary without the cuda
#   backend is refused unless ALLOW_NO_CUDA=1 (for trying device.sh on a CPU machine).
# Needs: strip (binutils), xz, apt-get (Debian or Ubuntu, for the loader packages).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/dnal-train}
DEST=.gpu
LIMIT_MB=60

[[ -x $BIN ]] || { echo "pack.sh: no binary at $BIN; build it with \`cargo build --release -p dnal-train --features cuda,wgpu\`" >&2; exit 1; }
if "$BIN" backends --json 2>/dev/null | grep -q '"backend":"cuda","state":"not_compiled"'; then
    if [[ ${ALLOW_NO_CUDA:-0} != 1 ]]; then
        echo "pack.sh: $BIN has no cuda backend; rebuild with \`--features cuda,wgpu\` (or set ALLOW_NO_CUDA=1)" >&2
        exit 1
    fi
    echo "pack.sh: note: $BIN has no cuda backend" >&2
fi

mkdir -p "$DEST.tmp"
trap 'rm -rf "$DEST.tmp"' EXIT
# The checkout at packing time and the binary's date and backends, for the results to name
# (device.sh prints it).
{
    echo "packed at commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "binary built $(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC')"
    "$BIN" backends 2>/dev/null | awk '$1 ~ /^(flex|ndarray|wgpu|cuda)$/ && $2 != "not" {print "backend " $1}'
    "$BIN" backends 2>/dev/null | grep '^kernel cache' || true
} > "$DEST.tmp/BUILD"
strip -o "$DEST.tmp/dnal-train" "$BIN"
xz -6 -T2 "$DEST.tmp/dnal-train"

lists=$(mktemp -d)
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
mkdir -p "$lists/partial"
apt-get "${o[@]}" update -qq
(cd "$DEST.tmp" && apt-get "${o[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
rm -rf "$lists"

# CubeCL's environments from earlier cards (device.sh returns them) outlive the binary: their
# entries are keyed by CubeCL's version and the kernels, not by the build.
for f in "$DEST"/cubecl-environment-*.tar.gz.part*; do [[ -f $f ]] && cp "$f" "$DEST.tmp/"; done
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
trap - EXIT
size=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST"
echo "pack.sh: $DEST holds $size MB"
if (( size > LIMIT_MB )); then
    echo "pack.sh: over $LIMIT_MB MB: too large to carry beside the working tree" >&2
    exit 1
fi
