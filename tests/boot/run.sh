#!/usr/bin/env bash
# The boot system test in one command: build artifacts with the test init, then boot
# them by every path. Arguments after the first are passed to boot-paths.sh as paths.
#
#   tests/boot/run.sh [ARTIFACT_DIR] [PATH ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(mktemp -d)}
shift || true
"$here/build-test-artifacts.sh" "$out" test-boot-paths
"$here/boot-paths.sh" "$out" "$@"
