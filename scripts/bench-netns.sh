#!/usr/bin/env bash
# Throughput between two network namespaces over a veth pair, every
# scenario in the same run: plaintext; tunsec with a bypass policy (the TUN
# path without IPsec); tunsec ESP aes-gcm-16, ESP aes-gcm-16 in UDP (sent
# as UDP GSO super-packets), ESP aes-cbc + hmac-sha256, the seed's bundle
# (ESP aes-cbc + hmac-sha1 under AH hmac-sha1), IPComp + ESP + AH; and
# strongSwan's libipsec (userspace ESP in UDP, tunnel mode: all it does)
# with aes128gcm16 and aes128-sha256.
#
#   scripts/bench-netns.sh [--secs 5] [--runs 3] [--only gcm,gcm-udp,...]
#                          [--no-udp] [--json FILE] [--png FILE]
#
# TCP x1 and -P 4 (median of RUNS, min-max), UDP 1300-byte datagrams at the
# highest rate losing under 1%, CPU microseconds per 1400-byte packet of
# each side's data plane, ratios to plaintext and to libipsec. As root;
# installs iperf3 and strongSwan when missing. WORKERS=N sets tunsec's
# workers (default 1: both "hosts" share this machine's cores). The logic
# is scripts/bench_netns.py.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
[ -x /usr/lib/ipsec/charon ] || need+=(strongswan-charon)
command -v swanctl >/dev/null || need+=(strongswan-swanctl)
[ -e /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ] || need+=(libcharon-extra-plugins)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" scripts/bench_netns.py "$@"
