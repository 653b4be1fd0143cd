#!/usr/bin/env bash
# tunsec's main job, shown: two hosts in two network namespaces, each
# running `tunsec run` with the seed's Linux-to-Windows policies (ESP
# aes-cbc + hmac-sha1 under AH hmac-sha1, ICMP bypassed, IPv4 and IPv6) and
# fresh keys. Real TCP goes both ways; tcpdump on the wire shows what the
# seed's capture showed; everything is cleaned up at the end.
# Needs root; installs iperf3/tcpdump via apt if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (network namespaces, TUN devices)" >&2; exit 1; }
missing=()
for t in iperf3 tcpdump ping nft; do command -v $t >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sed 's/^ping$/iputils-ping/; s/^nft$/nftables/' | tr '\n' ' ')
  echo "demo: installing $pkgs"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi
export NS_A=demoA NS_B=demoB
. netns/lib.sh
echo "== building tunsec (release)"
cargo build --release --quiet
bin=$PWD/target/release/tunsec
tmp=$(mktemp -d)
cleanup() {
  for ns in "$NS_A" "$NS_B"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.5
  netns/down.sh >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== two hosts: $NS_A ($A4, $A6) and $NS_B ($B4, $B6), joined by a veth pair"
netns/up.sh >/dev/null
netns/mkconf.sh windows "$tmp"
echo "== policies (the seed's, for these addresses) and fresh SAs: $NS_A's file"
grep -v '^add' "$tmp/a.conf" | sed 's/^/   /'
grep '^add' "$tmp/a.conf" | sed -E 's/0x[0-9a-f]{16,}/<fresh key>/g; s/^/   /'
rules_before=$(ip netns exec "$NS_A" ip rule)

echo "== starting tunsec run in each namespace"
ip netns exec "$NS_A" "$bin" run -c "$tmp/a.conf" --tun tsec0 --control "/run/tunsec/$NS_A.sock" >"$tmp/a.log" 2>&1 &
pa=$!
ip netns exec "$NS_B" "$bin" run -c "$tmp/b.conf" --tun tsec0 --control "/run/tunsec/$NS_B.sock" >"$tmp/b.log" 2>&1 &
pb=$!
for _ in $(seq 50); do grep -q " up: " "$tmp/a.log" && grep -q " up: " "$tmp/b.log" && break; sleep 0.1; done
grep " up: " "$tmp/a.log" | sed 's/^.*INFO[^a-z]*/   /'

ip netns exec "$NS_B" iperf3 -s -D -p 5201 >/dev/null 2>&1
# Any TCP or UDP between the hosts in the clear, during the whole demo?
ip netns exec "$NS_B" tcpdump -ni tsb0 -c 1 -w "$tmp/plain.pcap" 'tcp or udp' >/dev/null 2>&1 &
tdp=$!
# The first packets of each phase, for display.
capture() { ip netns exec "$NS_B" tcpdump -ni tsb0 -c "$1" -w "$tmp/$2.pcap" "$3" >/dev/null 2>&1 & }
sleep 1
echo "== ping $B4 and $B6 (ICMP is bypassed: in the clear, as in the seed)"
capture 8 icmp '(icmp or icmp6) and not ip6[40] > 129'
sleep 1
ip netns exec "$NS_A" ping -c 2 -W 2 "$B4" | tail -2 | sed 's/^/   /'
ip netns exec "$NS_A" ping -c 2 -W 2 "$B6" | tail -2 | sed 's/^/   /'
echo "== TCP $NS_A -> $NS_B over IPv4 (iperf3, 3 s)"
capture 6 v4 'ip proto 51'
sleep 0.5
ip netns exec "$NS_A" iperf3 -c "$B4" -p 5201 -t 3 | grep -E 'receiver' | sed 's/^/   /'
echo "== TCP $NS_B -> $NS_A over IPv6 (iperf3 -R, 3 s)"
capture 6 v6 'ip6 proto 51'
sleep 0.5
ip netns exec "$NS_A" iperf3 -c "$B6" -p 5201 -t 3 -R | grep -E 'receiver' | sed 's/^/   /'
sleep 0.5
for ns in "$NS_B"; do ip netns pids "$ns" | xargs -r ps -o pid=,comm= -p 2>/dev/null | awk '$2=="tcpdump"{print $1}' | xargs -r kill -INT 2>/dev/null || true; done
sleep 0.5

echo "== on the wire (tcpdump -n on $NS_B's veth): AH(...): ESP(...) both ways, ICMP plain"
show() { tcpdump -nr "$tmp/$1.pcap" 2>/dev/null | head -n "$2" | sed 's/^/   /' || true; }
show v4 3
show v6 3
show icmp 8
plain=$(tcpdump -nr "$tmp/plain.pcap" 2>/dev/null | wc -l)
echo "   TCP/UDP packets in the clear between the hosts during the demo: $plain"

echo "== stopping the daemons: counters, and everything restored"
kill -TERM "$pa" "$pb"
wait "$pa" "$pb" 2>/dev/null || true
grep "final counters" "$tmp/a.log" | sed 's/^.*final/   A: final/'
grep "final counters" "$tmp/b.log" | sed 's/^.*final/   B: final/'
if [ "$(ip netns exec "$NS_A" ip rule)" = "$rules_before" ] && ! ip netns exec "$NS_A" nft list tables | grep -q tunsec; then
  echo "   $NS_A's rules and nftables are as before"
else
  echo "demo: FAILED: $NS_A's plumbing was not restored" >&2; exit 1
fi
[ "$plain" = 0 ] || { echo "demo: FAILED: plaintext TCP/UDP on the wire" >&2; exit 1; }
echo "== demo OK"
