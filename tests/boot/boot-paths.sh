#!/usr/bin/env bash
# Boots the artifacts of 'cellimg build' under QEMU (TCG: these machines have no KVM) by
# every path a node can take, and checks that /init ran with the image's command line.
#
#   tests/boot/boot-paths.sh ARTIFACT_DIR [kernel] [bios] [uefi] [pxe] [uefi-pxe]
#
#   kernel  -kernel/-initrd with the manifest's command line
#   bios    -cdrom node.iso, SeaBIOS
#   uefi    -cdrom node.iso, OVMF
#   pxe     iPXE ROM of a virtio-net NIC, TFTP from QEMU user networking, pxe/boot.ipxe
#   uefi-pxe  the same under OVMF (iPXE as an EFI driver; initrd through the EFI stub)
#
# The /init must print "CELLD-TEST-INIT version=<image version> uptime=<s>" on the
# console and power off (tests/boot/testinit.c does; build-test-artifacts.sh packs it).
# Each path's serial log is kept in $LOG_DIR (default: a temp dir) and printed when the
# path fails. Exits non-zero naming the failed paths.
# Needs: qemu-system-x86 ovmf ipxe-qemu.
set -uo pipefail

[ $# -ge 1 ] || { echo "usage: $0 ARTIFACT_DIR [kernel|bios|uefi|pxe|uefi-pxe ...]" >&2; exit 2; }
dir=$(cd "$1" && pwd) || exit 2
shift
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(kernel bios uefi pxe uefi-pxe)
for path in "${paths[@]}"; do
    case "$path" in kernel|bios|uefi|pxe|uefi-pxe) ;;
        *) echo "boot-paths: unknown path '$path' (kernel, bios, uefi, pxe, uefi-pxe)" >&2; exit 2 ;;
    esac
done
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"

manifest="$dir/manifest.json"
[ -f "$manifest" ] || { echo "boot-paths: $manifest missing: run cellimg build first" >&2; exit 2; }
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$manifest" "$1"; }
version=$(field version)
cmdline=$(field kernel_cmdline)
ovmf=${OVMF:-/usr/share/ovmf/OVMF.fd}

# QEMU common to all paths: no display, serial to a file, no default NIC (firmware would
# try to network-boot from it first), exit instead of rebooting.
qemu_base=(qemu-system-x86_64 -accel tcg -m 512 -smp 2 -display none -monitor none
           -no-reboot)

boot() {
    local path=$1 log=$2
    local -a args
    case "$path" in
        kernel) args=(-nic none -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.cpio.gz"
                      -append "$cmdline") ;;
        bios)   args=(-nic none -cdrom "$dir/node.iso" -boot d) ;;
        uefi)   args=(-nic none -bios "$ovmf" -cdrom "$dir/node.iso") ;;
        pxe)    args=(-netdev "user,id=n,tftp=$dir,bootfile=pxe/boot.ipxe"
                      -device virtio-net-pci,netdev=n -boot n) ;;
        uefi-pxe) args=(-bios "$ovmf" -netdev "user,id=n,tftp=$dir,bootfile=pxe/boot.ipxe"
                        -device virtio-net-pci,netdev=n -boot n) ;;
        *) echo "boot-paths: unknown path '$path' (kernel, bios, uefi, pxe, uefi-pxe)" >&2
           return 2 ;;
    esac
    local limit=${TIMEOUT:-120}
    case "$path" in uefi*) limit=${TIMEOUT_UEFI:-300} ;; esac
    timeout "$limit" "${qemu_base[@]}" -serial "file:$log" "${args[@]}" </dev/null
}

failed=()
printf '%-9s %-6s %8s %14s\n' path result wall_s init_uptime_s
for path in "${paths[@]}"; do
    log="$log_dir/$path.log"
    : >"$log"
    start=$(date +%s.%N)
    boot "$path" "$log"
    status=$?
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    marker=$(grep -a -o "CELLD-TEST-INIT version=[^ ]* uptime=[0-9.]*" "$log" | head -1)
    uptime=${marker##*uptime=}
    if [ "$marker" = "CELLD-TEST-INIT version=$version uptime=$uptime" ] && [ -n "$uptime" ]; then
        printf '%-9s %-6s %8.1f %14s\n' "$path" ok "$wall" "$uptime"
    else
        printf '%-9s %-6s %8.1f %14s\n' "$path" FAIL "$wall" "-"
        echo "--- $path: qemu exit $status$([ $status = 124 ] && echo ' (timeout)'), no marker for version $version; serial log $log:"
        cat -v "$log" | tail -60
        echo "--- end of $path"
        failed+=("$path")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "boot-paths: FAILED: ${failed[*]} (logs in $log_dir)" >&2
    exit 1
fi
echo "boot-paths: all booted: ${paths[*]} (logs in $log_dir)"
