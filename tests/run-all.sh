#!/usr/bin/env bash
# Every test of celld, in one command (CI runs exactly this through .ci/run):
#   1. format and lint;
#   2. unit tests (unprivileged) and property tests over spec validation and the OCI
#      mapping (a fixed number of cases, so the run is bounded);
#   3. privileged tests: a real celld daemon driven over gRPC with hostile tasks
#      (namespaces, cgroups, seccomp, capabilities, landlock), DHCP in network namespaces;
#   4. image tests: deterministic initramfs, cellimg's input checks;
#   5. system tests: the real image (kernel from kernel-config/, static celld as /init)
#      booted under QEMU by kernel+initrd, ISO on BIOS, ISO on UEFI and PXE, driven over
#      the network;
#   6. fuzzing: every request's decoding and validation, 30 s per target (tests/fuzz).
# It installs the Debian packages it needs (idempotent) so a fresh machine can run it.
# The kernel is built once per machine and cached (image/build-kernel.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(busybox-static crun runc build-essential dnsmasq iputils-ping iproute2
          linux-source-6.1 bc flex bison libelf-dev libssl-dev xz-utils
          grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools
          qemu-system-x86 ovmf ipxe-qemu python3 musl-tools)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run-all: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
fi
rustup target list --installed | grep -qx x86_64-unknown-linux-musl ||
    rustup target add x86_64-unknown-linux-musl

if [ "$(id -u)" != 0 ]; then
    echo "run-all: the privileged and system tests need root (namespaces, cgroups); run as root" >&2
    exit 1
fi

step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

step "format"
cargo fmt --all --check
step "clippy"
cargo clippy --all-targets -- -D warnings

step "node image: kernel (cached), static celld, cellimg build"
kernel=$(nice image/build-kernel.sh | tail -n 1)
cargo build --release --target x86_64-unknown-linux-musl -p celld --bin celld
artifacts=$(mktemp -d /tmp/celld-artifacts.XXXXXX)
# A second version of the same image: the kexec test reimages a node from one to the other.
next=$(mktemp -d /tmp/celld-artifacts-next.XXXXXX)
trap 'rm -rf "$artifacts" "$next"' EXIT
version="test-$(git rev-parse --short HEAD 2>/dev/null || echo local)"
celld_version="$(cargo metadata -q --no-deps --format-version 1 | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="celld"))')"
# Most QEMU tests talk to celld directly, without a master to give it a certificate, so
# their images carry celld.insecure=1; the PXE cell test (tests/system/cell.rs) boots an
# image without it and runs the whole cell over mutual TLS.
secure=$(mktemp -d /tmp/celld-artifacts-secure.XXXXXX)
trap 'rm -rf "$artifacts" "$next" "$secure"' EXIT
build_image() { # OUT VERSION [CMDLINE...]
    cargo run -q -p cellimg -- build --out "$1" --version "$2" \
        --celld target/x86_64-unknown-linux-musl/release/celld \
        --celld-version "$celld_version" --kernel "$kernel" "${@:3}"
}
build_image "$artifacts" "$version" --cmdline celld.insecure=1
build_image "$next" "$version-next" --cmdline celld.insecure=1
build_image "$secure" "$version-secure"

step "tests: unit, property, privileged, image, system (QEMU)"
CELLD_ARTIFACTS=$artifacts CELLD_ARTIFACTS_NEXT=$next CELLD_ARTIFACTS_SECURE=$secure \
    cargo test --workspace

step "fuzz: every request's decoding and validation, 30 s per target"
tests/fuzz/run.sh 30
