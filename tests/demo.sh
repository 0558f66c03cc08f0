#!/usr/bin/env bash
# The demo on a fresh machine: install what is needed, build celld, start it as a daemon
# on loopback with a busybox rootfs, run a few tasks (one polite, one memory hog, one
# that tries to escape) and show what the node reports. Needs root.
#
#   tests/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(busybox-static build-essential)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
fi
[ "$(id -u)" = 0 ] || { echo "demo: celld needs root for namespaces and cgroups" >&2; exit 1; }

cargo build --release -p celld --bins --example demo
demo=/var/lib/celld-demo
root=$demo/rootfs
rm -rf "$root"
mkdir -p "$root"/{bin,proc,dev,sys,tmp,etc}
cp /bin/busybox "$root/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
cp target/release/celld-probe "$root/bin/"
# celld-probe is linked against glibc: give it its libraries.
for lib in $(ldd target/release/celld-probe | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"; cp "$lib" "$root$lib"
done

addr=127.0.0.1:7100
target/release/celld --listen $addr --state-dir $demo/state --cgroup-parent celld-demo \
    2>$demo/celld.log &
celld=$!
trap 'kill $celld 2>/dev/null; wait $celld 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/7100) 2>/dev/null && break; sleep 0.1; done
target/release/examples/demo $addr "$root"
echo; echo "celld log: $demo/celld.log"
