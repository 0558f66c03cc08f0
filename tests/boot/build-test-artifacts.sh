#!/usr/bin/env bash
# Builds boot artifacts whose /init is tests/boot/testinit.c (a tiny static C program
# that prints a marker and powers off) instead of celld, to check the boot paths alone.
#
#   tests/boot/build-test-artifacts.sh OUT_DIR [VERSION]
#
# Uses the cached kernel from image/build-kernel.sh (built on first use, ~5 min).
# Needs: gcc (static glibc), cargo, and cellimg's packages (see image/build-kernel.sh,
# grub-pc-bin grub-efi-amd64-bin xorriso mtools busybox-static).
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [VERSION]" >&2; exit 2; }
out=$1
version=${2:-test-$(date -u +%Y%m%d)}
repo=$(cd "$(dirname "$0")/../.." && pwd)

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -static -Os -s -o "$work/testinit" "$repo/tests/boot/testinit.c"

kernel=$(nice -n 19 "$repo/image/build-kernel.sh")
cargo build --quiet --manifest-path "$repo/Cargo.toml" -p cellimg
"$repo/target/debug/cellimg" build --out "$out" --version "$version" \
    --celld "$work/testinit" --celld-version testinit --kernel "$kernel"
