#!/usr/bin/env bash
# Every test of celld, in one command (CI runs exactly this through .ci/run):
#   1. format and lint;
#   2. unit tests (unprivileged) and property tests over spec validation and the OCI
#      mapping (a fixed number of cases, so the run is bounded);
#   3. privileged tests: a real celld daemon driven over gRPC with hostile tasks
#      (namespaces, cgroups, seccomp, capabilities, landlock) -- these need root;
#   4. image tests: deterministic initramfs, cellimg's input checks.
# It installs the Debian packages it needs (idempotent) so a fresh machine can run it.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(busybox-static crun runc build-essential)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run-all: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
fi

if [ "$(id -u)" != 0 ]; then
    echo "run-all: the privileged tests need root (namespaces, cgroups); run as root" >&2
    exit 1
fi

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all --check
step "clippy"
cargo clippy --all-targets -- -D warnings
step "tests: unit, property, privileged (agent), image"
cargo test --workspace
