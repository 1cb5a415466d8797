#!/usr/bin/env bash
# Puts a static LLVM where burn's CUDA backend looks for one, so that the `cuda` feature builds
# on a machine that reaches PyPI but not GitHub.
#
# burn's cuda backend (cubecl-cuda) links cubecl-llvm, whose build asks tracel-llvm-bundler for
# an LLVM: the bundler downloads its own build from GitHub's release pages into
# ${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-<version>/ unless that folder already holds
# one (marked by a `.tracel-llvm-installed` file), and reads everything else through the folder's
# `bin/llvm-config --link-static`. The `mlc-llvm-static` wheels on PyPI carry the same major
# release of LLVM as static archives with headers and an llvm-config; its extra-targets wheel adds
# the NVPTX back end. This script downloads both, unpacks them into that folder and checks what
# the build will ask of it.
#
# Usage: benches/gpu/llvm-from-pypi.sh
# then:  cargo build --release -p dnal-train --features cuda,wgpu
# Needs: python3 with pip, unzip, and libzstd-dev and zlib1g-dev for the link (llvm-config
# --system-libs names -lz and -lzstd).
set -euo pipefail
cd "$(dirname "$0")/../.."

sdk_version=23.1.1.post0
# The bundler's version names the folder it looks in (tracel-llvm-bundler 23.1.0-4 looks in
# tracel-llvm-23.1.0-4); take it from the lock file so that an update of burn is noticed here.
bundler=$(awk '/^name = "tracel-llvm-bundler"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
if [ -z "$bundler" ]; then
    echo "Cargo.lock has no tracel-llvm-bundler: the cuda feature no longer needs this script" >&2
    exit 1
fi
if [ "${bundler%%.*}" != "${sdk_version%%.*}" ]; then
    echo "tracel-llvm-bundler $bundler wants LLVM ${bundler%%.*}, this script installs $sdk_version:" \
        "update sdk_version to a matching mlc-llvm-static release" >&2
    exit 1
fi
dest="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-$bundler"
if [ -e "$dest/.tracel-llvm-installed" ]; then
    echo "an LLVM is already installed in $dest; remove that folder to replace it"
    exit 0
fi
for lib in libz.so libzstd.so; do
    if ! ldconfig -p | grep -qE "^[[:space:]]+$lib "; then
        echo "$lib not found: LLVM's link needs it (Debian: apt-get install zlib1g-dev libzstd-dev)" >&2
        exit 1
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 -d "$work/wheels" \
    "mlc-llvm-static==$sdk_version" "mlc-llvm-static-extra-targets==$sdk_version"
for wheel in "$work"/wheels/*.whl; do
    unzip -q -o "$wheel" 'mlc_llvm_static/static/*' -d "$work/unpacked"
done
sdk="$work/unpacked/mlc_llvm_static/static"

version=$("$sdk/bin/llvm-config" --version)
if ! "$sdk/bin/llvm-config" --link-static --libs | tr ' ' '\n' | grep -qx -- -lLLVMNVPTXCodeGen; then
    echo "the unpacked LLVM $version has no NVPTX back end: cubecl-cuda needs it" >&2
    exit 1
fi

# Unpacked beside the destination and renamed into place, so that a stopped run leaves no
# half-filled folder for the bundler to trust.
mkdir -p "$(dirname "$dest")"
staging="$dest.partial"
rm -rf "$staging"
mv "$sdk" "$staging"
touch "$staging/.tracel-llvm-installed"
mv "$staging" "$dest"
echo "LLVM $version (mlc-llvm-static $sdk_version, with NVPTX) installed in $dest"
