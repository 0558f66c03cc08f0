#!/usr/bin/env bash
# The boot system test in one command: build artifacts with the test init twice (the two
# builds must be byte-identical: manifest.json holds every artifact's sha256), then boot
# them by every path. Arguments after the first are passed to boot-paths.sh as paths.
#
#   tests/boot/run.sh [ARTIFACT_DIR] [PATH ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(mktemp -d)}
shift || true
again=$(mktemp -d)
trap 'rm -rf "$again"' EXIT
"$here/build-test-artifacts.sh" "$out" test-boot-paths
"$here/build-test-artifacts.sh" "$again" test-boot-paths
if ! cmp -s "$out/manifest.json" "$again/manifest.json"; then
    echo "run: two builds of the same inputs differ:" >&2
    diff "$out/manifest.json" "$again/manifest.json" >&2 || true
    exit 1
fi
echo "run: two builds are byte-identical"
"$here/boot-paths.sh" "$out" "$@"
