#!/usr/bin/env bash
# Build tunsec, run every Rust test, then the interop suite (tests/interop),
# which checks tunsec against independent implementations: scapy, Python's
# zlib, tshark and tcpdump; then, as root, the end-to-end suite (tests/e2e):
# `tunsec run` daemons in two network namespaces with real traffic between
# them (release build; skipped with a message when not root).
#
#   scripts/test.sh [pytest arguments...]
#
# The Python side lives in .venv at the repository root, created on first
# use from tests/interop/requirements.txt (and refreshed when that changes).
# TUNSEC_BIN overrides the binary under test (default target/debug/tunsec for
# the interop suite, target/release/tunsec for the e2e suite).
# As root it also builds and tests the Debian package and its unit under a
# real systemd (scripts/test-package.sh; TUNSEC_TEST_PACKAGE=0 skips it).
#
# After the Rust tests, every cargo fuzz target (fuzz/) runs for
# TUNSEC_FUZZ_SECONDS seconds (default 15; 0 builds them only) through
# scripts/fuzz.sh, which installs cargo-fuzz when missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# aws-lc-rs (the AEADs) compiles AWS-LC's C sources: it needs a C compiler.
if ! command -v cc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null
    else
        echo "scripts/test.sh: building tunsec needs a C compiler (apt-get install -y gcc)" >&2
        exit 1
    fi
fi

cargo build
cargo test
# The API documentation builds without a broken or private link.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
TUNSEC_FUZZ_SECONDS=${TUNSEC_FUZZ_SECONDS:-15} scripts/fuzz.sh

req=tests/interop/requirements.txt
stamp=.venv/.requirements.installed
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! cmp -s "$req" "$stamp"; then
    .venv/bin/python -m pip install -q -r "$req"
    cp "$req" "$stamp"
fi

# tshark and tcpdump come from Debian; as root, install them when missing.
missing=()
for tool in tshark tcpdump; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "scripts/test.sh: tests/interop needs ${missing[*]} (apt-get install -y ${missing[*]})" >&2
        exit 1
    fi
fi

.venv/bin/python -m pytest -q tests/interop "$@"

# The end-to-end suite needs root: network namespaces, TUN devices,
# nftables, raw and packet sockets.
if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: skipping tests/e2e: the end-to-end suite needs root (network namespaces, TUN devices, nftables)" >&2
    exit 0
fi
missing=()
for pair in nft:nftables ip:iproute2 ping:iputils-ping swanctl:strongswan-swanctl /usr/lib/ipsec/charon:strongswan-charon; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "${pair%%:*}" ] || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release
.venv/bin/python -m pytest -q tests/e2e

# The Debian package (cargo-deb, a Debian 12 made by debootstrap, install,
# the unit under a real systemd booted by systemd-nspawn, purge): about
# 2.5 minutes the first time (a download of Debian 12, cached in .cache/),
# half a minute later. As root, unless TUNSEC_TEST_PACKAGE=0.
if [ "$(id -u)" = 0 ] && [ "${TUNSEC_TEST_PACKAGE:-1}" = 1 ]; then
    scripts/test-package.sh
else
    echo "scripts/test.sh: skipping the Debian package test (needs root; TUNSEC_TEST_PACKAGE=0 skips it)" >&2
fi
