#!/usr/bin/env bash
# Fuzzes the decoding and validation of every request of celld and cellmaster:
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
# runs each target (default: all four) for SECONDS (default 30) starting from the seeds
# in tests/fuzz/corpus/<target>/, and fails on the first crash, naming the input that
# caused it (kept in tests/fuzz/artifacts/<target>/). New inputs the fuzzer finds go to
# a scratch directory, so the checked-in corpus stays the seeds; set FUZZ_KEEP_CORPUS=DIR
# to keep them.
#
# It installs cargo-fuzz when missing. It uses stable Rust with `--sanitizer none`: the
# code under test is safe Rust, a panic is what it looks for, and a fresh machine has
# stable only. FUZZ_TOOLCHAIN=nightly FUZZ_SANITIZER=address gives AddressSanitizer.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(node_requests master_requests jobfile image_manifest)
sanitizer=${FUZZ_SANITIZER:-none}
toolchain=${FUZZ_TOOLCHAIN:+"+$FUZZ_TOOLCHAIN"}
cargo_fuzz_version=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
    cargo install --locked --version "$cargo_fuzz_version" cargo-fuzz
fi

# The same build options for build and run, or run builds again. 16 codegen units instead
# of cargo-fuzz's 1: the build takes minutes instead of a quarter of an hour on two cores.
fuzz() {
    cargo $toolchain fuzz "$1" --fuzz-dir tests/fuzz --sanitizer "$sanitizer" \
        --codegen-units 16 "${@:2}"
}

start=$(date +%s)
fuzz build
echo "fuzz: built in $(($(date +%s) - start)) s"

scratch=${FUZZ_KEEP_CORPUS:-$(mktemp -d /tmp/celld-fuzz.XXXXXX)}
[ -n "${FUZZ_KEEP_CORPUS:-}" ] || trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "tests/fuzz/artifacts/$t"
    rm -f "tests/fuzz/artifacts/$t"/*
    log="$scratch/$t.log"
    # The first corpus directory takes what the fuzzer finds; the seeds are only read.
    if fuzz run "$t" "$scratch/$t" "tests/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        final=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*')
        echo "fuzz: $t: ${runs:-?} runs in ${seconds} s, ${speed:-?} exec/s, $final"
    else
        tail -n 40 "$log" >&2
        for a in "tests/fuzz/artifacts/$t"/*; do
            [ -e "$a" ] && echo "fuzz: $t crashed on $a (replay: cargo${toolchain:+ $toolchain} fuzz run --fuzz-dir tests/fuzz --sanitizer $sanitizer --codegen-units 16 $t $a)" >&2
        done
        echo "fuzz: $t failed; its log is above" >&2
        exit 1
    fi
done
