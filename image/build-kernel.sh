#!/usr/bin/env bash
# Build the node kernel from Debian's linux-source-6.1 and kernel-config/fragment.config.
#
#   image/build-kernel.sh            # prints the path of the cached bzImage
#
# The result is cached outside the checkout, keyed by the sha256 of the fragment and the
# source package version, so a second run with the same inputs is instant:
#   $CELLD_KERNEL_CACHE/<key>/bzImage and .config   (default /var/cache/celld/kernel)
# Needs: linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev xz-utils.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
fragment="$here/kernel-config/fragment.config"
required="$here/kernel-config/required.txt"
cache=${CELLD_KERNEL_CACHE:-/var/cache/celld/kernel}
pkg=linux-source-6.1
tarball=/usr/src/$pkg.tar.xz
jobs=${JOBS:-2}

die() { echo "build-kernel: $*" >&2; exit 1; }

[ -f "$tarball" ] || die "$tarball missing: apt-get install -y $pkg"
version=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null) || die "cannot read the version of package $pkg"
key=$( { sha256sum <"$fragment"; echo "$pkg $version"; } | sha256sum | cut -c1-64)
out="$cache/$key"

if [ -f "$out/bzImage" ] && [ -f "$out/.config" ]; then
    echo "$out/bzImage"
    exit 0
fi

# Unpacked source is shared by all fragments of the same package version.
src="$cache/src-$version"
if [ ! -f "$src/.unpacked" ]; then
    echo "build-kernel: unpacking $tarball" >&2
    rm -rf "$src" && mkdir -p "$src"
    tar -xJf "$tarball" -C "$src" --strip-components=1
    touch "$src/.unpacked"
fi

build="$cache/build-$key"
rm -rf "$build" && mkdir -p "$build"
echo "build-kernel: configuring in $build" >&2
# The merge tools are chatty (every overridden value); keep their output in a log.
log="$build/config.log"
make -s -C "$src" O="$build" tinyconfig >"$log" 2>&1 || { cat "$log" >&2; die "make tinyconfig failed"; }
# -m merges without running make; olddefconfig then resolves dependencies.
(cd "$build" && "$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$fragment") >>"$log" 2>&1 \
    || { cat "$log" >&2; die "merge_config.sh failed"; }
make -s -C "$src" O="$build" olddefconfig >>"$log" 2>&1 || { cat "$log" >&2; die "make olddefconfig failed"; }

missing=0
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    if ! grep -qxF -- "$line" "$build/.config"; then
        echo "build-kernel: required option lost in .config: $line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$build/.config" || echo 'absent'))" >&2
        missing=1
    fi
done <"$required"
[ "$missing" = 0 ] || die "kernel config lacks required options (see above); fix kernel-config/fragment.config"

echo "build-kernel: make -j$jobs bzImage (several minutes)" >&2
make -s -C "$src" O="$build" -j"$jobs" bzImage >&2

mkdir -p "$out.tmp"
cp "$build/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$build/.config" "$out.tmp/.config"
rm -rf "$out" && mv "$out.tmp" "$out"
rm -rf "$build"
echo "$out/bzImage"
