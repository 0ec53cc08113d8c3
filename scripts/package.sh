#!/usr/bin/env bash
# Builds the Debian packages of the three backends with cargo-deb, from a release build:
#
#   target/debian/vhost-blk-backend_VERSION-1_amd64.deb   (+ -dbgsym_..._amd64.ddeb)
#   target/debian/vhost-net-backend_VERSION-1_amd64.deb   (+ -dbgsym)
#   target/debian/serial-backend_VERSION-1_amd64.deb      (+ -dbgsym)
#
# Each holds the program (/usr/bin), its vhost-user capability file
# (/usr/share/qemu/vhost-user/50-PROGRAM.json), its man pages (rendered from its clap
# command line by `xtask man`), the systemd template units PROGRAM@.socket and
# PROGRAM@.service, the vhost-dataplane system user (sysusers.d) and an example instance
# configuration (/etc/vhost-dataplane/{blk,net,serial}/example.conf.sample). The debug
# symbols go to the -dbgsym.ddeb next to each package (install it too to debug a crash).
# See "Deployment" in README.md.
#
# Installs cargo-deb (cargo install cargo-deb --locked) if it is missing, into cargo's bin
# directory (or TARGET/tools/bin where that is read-only); needs objcopy (binutils, there
# with gcc) for the debug symbols.
#
# Usage: scripts/package.sh [--out DIR] [--fast]
#   --out DIR   where the packages go (default target/debian); their paths are printed
#   --fast      lighter compression (packages a few times larger, built in seconds
#               instead of half a minute; the package tests use it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=target/debian
fast=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --fast) fast=(--fast); shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "package.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
programs=(vhost-blk-backend vhost-net-backend serial-backend)
log() { echo "package.sh: $*" >&2; }

# cargo-deb reads release products from the real target directory (it may be elsewhere
# than ./target: CARGO_TARGET_DIR, .cargo/config.toml); so do the man pages.
target_dir=$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { log "cannot tell cargo's target directory"; exit 1; }

# The version cargo-deb's manifest keys ([package.metadata.deb]) were written for. Into
# cargo's bin directory, or the target directory where that is read-only (a shared
# toolchain, as scripts/fresh-check.sh binds it).
CARGO_DEB_VERSION=3.8.0
tools=$target_dir/tools
# Only cargo-deb's runs see it (a changed PATH would rebuild crates whose build scripts
# watch it).
cargo_deb() { PATH=$PATH:$tools/bin cargo deb "$@"; }
if ! cargo_deb --version >/dev/null 2>&1; then
    cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
    root=()
    [ -w "$cargo_bin" ] || root=(--root "$tools")
    log "installing cargo-deb $CARGO_DEB_VERSION (cargo install ${root[*]}, once)"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" "${root[@]}"
fi
command -v objcopy >/dev/null || { log "objcopy not found: apt-get install binutils"; exit 1; }

log "building ${programs[*]} and xtask (release)"
cargo build --release --locked "${programs[@]/#/-p=}" -p xtask
man_dir=$target_dir/release/man
rm -rf "$man_dir"
"$target_dir/release/xtask" man "$man_dir" >/dev/null
# Debian ships man pages compressed (cargo-deb compresses only files it did not build).
gzip -9nf "$man_dir"/*.1

mkdir -p "$out"
for p in "${programs[@]}"; do
    log "packaging $p"
    cargo_deb --no-build --locked --dbgsym "${fast[@]}" -p "$p" -o "$out" >/dev/null
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
for p in "${programs[@]}"; do
    deb=$out/${p}_${version}-1_$arch.deb
    [ -f "$deb" ] || { log "cargo deb made no $deb"; exit 1; }
    echo "$deb"
done
