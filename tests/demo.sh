#!/usr/bin/env bash
# The demo cell on one machine. Installs what it needs, builds the node image (kernel
# cached, static celld, cellimg), then in a network namespace: a bridge, dnsmasq handing
# out addresses and the master's iPXE URL, cellmaster serving iPXE, the image and gRPC,
# and two QEMU machines that PXE-boot into the image, register and are polled. It shows
# the cell's nodes, runs a few tasks on one node (a polite one, a memory hog, an escape
# attempt) and shows what the node reports. Needs root. KEEP=1 leaves the cell running.
#
#   tests/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(busybox-static build-essential dnsmasq iproute2 qemu-system-x86 ipxe-qemu
          linux-source-6.1 bc flex bison libelf-dev libssl-dev xz-utils
          grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools python3 musl-tools)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
fi
[ "$(id -u)" = 0 ] || { echo "demo: needs root (namespaces, bridge, taps)" >&2; exit 1; }
rustup target list --installed | grep -qx x86_64-unknown-linux-musl ||
    rustup target add x86_64-unknown-linux-musl

say() { printf '\n== %s\n' "$*"; }
say "building: kernel (cached after the first time), static celld, cellmaster, image"
kernel=$(nice image/build-kernel.sh | tail -n 1)
cargo build --release --target x86_64-unknown-linux-musl -p celld --bin celld
cargo build --release -p cellmaster --bins && cargo build --release -p celld --example demo
demo=/var/lib/celld-demo
rm -rf "$demo/image" "$demo/image2"; mkdir -p "$demo"
for v in 1 2; do
    out=$demo/image; [ $v = 2 ] && out=$demo/image2
    cargo run -q --release -p cellimg -- build --out "$out" --version demo-$v \
        --celld target/x86_64-unknown-linux-musl/release/celld --celld-version 0.1.0 \
        --kernel "$kernel" --no-iso
done

ns=celld-demo
ip netns del $ns 2>/dev/null || true
pids=()
cleanup() {
    [ "${KEEP:-0}" = 1 ] && { echo "cell left running (netns $ns); ip netns del $ns to end"; return; }
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
}
trap cleanup EXIT
# Background processes are started with `ip netns exec` directly so $! is their pid.
in_ns() { ip netns exec $ns "$@"; }
ip netns add $ns
in_ns ip link set lo up
in_ns ip link add br0 type bridge
in_ns ip addr add 10.77.0.1/24 dev br0
in_ns ip link set br0 up
for i in 0 1; do
    in_ns ip tuntap add dev tap$i mode tap
    in_ns ip link set tap$i master br0
    in_ns ip link set tap$i up
done

say "cell: dnsmasq (DHCP + iPXE URL), cellmaster on 10.77.0.1:7000 (gRPC) and :7080 (HTTP)"
ip netns exec $ns dnsmasq --no-daemon --conf-file=/dev/null --interface=br0 --bind-interfaces --no-ping \
    --port=0 --dhcp-range=10.77.0.100,10.77.0.150,12h --dhcp-boot=http://10.77.0.1:7080/ipxe \
    --dhcp-leasefile=$demo/leases 2>$demo/dnsmasq.log & pids+=($!)
rm -rf $demo/state.db* $demo/images $demo/master-signing.key $demo/ca.crt $demo/ca.key
# Mutual TLS: the cell CA is made here (beside the store), with an admin bundle for the
# commands below; the nodes join with a PXE token made once the master is up.
target/release/cellmaster admin-cert --role admin --out $demo/admin.bundle --state $demo/state.db \
    --master 10.77.0.1:7000
export CELLMASTER_BUNDLE=$demo/admin.bundle
ip netns exec $ns target/release/cellmaster serve --listen 10.77.0.1:7000 --http 10.77.0.1:7080 \
    --image-dir $demo/image --poll-interval-ms 1000 --state $demo/state.db \
    2>$demo/cellmaster.log & pids+=($!)
for _ in $(seq 100); do
    token=$(in_ns target/release/cellmaster token create --ttl 1h --uses 6 --pxe \
        --master 10.77.0.1:7000 2>/dev/null) && break
    sleep 0.1
done
say "join token for the PXE script (2 nodes, 2 reimages each at most): ${token%%.*}.…"
say "booting two machines by PXE (QEMU, TCG: about 30 s)"
for i in 0 1; do
    ip netns exec $ns qemu-system-x86_64 -accel tcg -m 512 -display none -monitor none -no-reboot -boot n \
        -netdev tap,id=n0,ifname=tap$i,script=no,downscript=no \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:77:00:0$((i + 1)) \
        -serial file:$demo/node$i.log </dev/null & pids+=($!)
done
for _ in $(seq 240); do
    ready=$(in_ns target/release/cellmaster nodes --master 10.77.0.1:7000 --json 2>/dev/null |
            grep -c '"liveness": "READY"' || true)
    [ "$ready" = 2 ] && break
    sleep 1
done
say "the cell's nodes (cellmaster nodes)"
in_ns target/release/cellmaster nodes --master 10.77.0.1:7000
read -r node_id node <<<"$(in_ns target/release/cellmaster nodes --master 10.77.0.1:7000 --json |
    python3 -c 'import json,sys; n=json.load(sys.stdin)[0]; print(n["id"], n["address"])')"
say "tasks on $node_id ($node) over mutual TLS with the admin bundle, from the image's busybox rootfs"
in_ns target/release/examples/demo "$node" /rootfs/busybox "$node_id"
say "a job of two replicas (cellmaster submit), spread over the nodes"
cat > $demo/web.toml <<'JOB'
name = "web"
replicas = 2
priority = 100
argv = ["httpd", "-f", "-p", "8080"]
rootfs = "/rootfs/busybox"
[resources]
memory = "32MiB"
cpu_millis = 250
JOB
in_ns target/release/cellmaster submit $demo/web.toml --master 10.77.0.1:7000
for _ in $(seq 30); do
    running=$(in_ns target/release/cellmaster tasks --master 10.77.0.1:7000 --json |
              grep -c '"state": "running"' || true)
    [ "$running" = 2 ] && break
    sleep 1
done
in_ns target/release/cellmaster tasks --master 10.77.0.1:7000
in_ns target/release/cellmaster jobs --master 10.77.0.1:7000
say "drain node-770002 (cellmaster drain): its replica moves, within the job's budget"
in_ns target/release/cellmaster drain node-770002 --master 10.77.0.1:7000 --timeout-s 120
in_ns target/release/cellmaster tasks --master 10.77.0.1:7000
in_ns target/release/cellmaster uncordon node-770002 --master 10.77.0.1:7000
say "a new image, demo-2 (cellmaster image add), rolled over the cell a node at a time (cellmaster reimage)"
in_ns target/release/cellmaster image add $demo/image2 --master 10.77.0.1:7000
in_ns target/release/cellmaster reimage --to demo-2 --max-unavailable 1 --master 10.77.0.1:7000
in_ns target/release/cellmaster nodes --master 10.77.0.1:7000
in_ns target/release/cellmaster tasks --master 10.77.0.1:7000
say "logs: $demo/{cellmaster,node0,node1}.log"
