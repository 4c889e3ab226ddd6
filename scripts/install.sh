#!/usr/bin/env bash
# Install everything peerstar and its tests need on a fresh Debian machine (idempotent).
# System packages: containerd + runc, ctr-remote (stargz-snapshotter), skopeo, an upstream
# registry (docker-registry), the Go eStargz library (conformance oracle), FUSE, busybox for
# locally built sample images. Python: peerstar itself with its extras. npm: js-ipfs for
# tests that need a real IPFS daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  containerd runc stargz-snapshotter skopeo docker-registry
  golang-go golang-github-containerd-stargz-snapshotter-dev golang-github-containerd-containerd-dev
  fuse3 libfuse3-dev pkg-config busybox-static zstd iproute2 ca-certificates openssl
  # bench/coldstart: the image's content (a Debian Python tree) and the file recorder
  strace python3-minimal libpython3.11-stdlib gcc-12
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian starts services from these packages; tests run their own private instances.
for svc in containerd docker-registry; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

# A Debian system Python refuses pip installs outside a venv (PEP 668); this machine kind
# uses its own Python, where the variable is ignored.
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check \
  -e '.[fuse,grpc,test]'
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi

# js-ipfs 0.66.1 (pinned by package-lock.json): the real IPFS daemon the tests run.
if [ -f tests/support/jsipfs/package.json ] && [ ! -d tests/support/jsipfs/node_modules/ipfs ]; then
  if ! command -v npm >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm
  fi
  npm install --prefix tests/support/jsipfs --no-audit --no-fund --loglevel=error
fi
echo "peerstar: install complete"
