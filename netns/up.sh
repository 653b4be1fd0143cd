#!/usr/bin/env bash
# Build the two-host topology (see lib.sh). Idempotent: an old one is
# torn down first.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
"$here/down.sh" 2>/dev/null || true
ip netns add "$NS_A"
ip netns add "$NS_B"
# No DAD: set before the veth exists, since a new interface copies the
# namespace's default (set after, its link-local address would still go
# through DAD and appear a second or two later).
for ns in "$NS_A" "$NS_B"; do
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
ip link add tsa0 netns "$NS_A" type veth peer name tsb0 netns "$NS_B"
for ns in "$NS_A" "$NS_B"; do
  ip -n "$ns" link set lo up
done
ip -n "$NS_A" addr add "$A4/24" dev tsa0
ip -n "$NS_B" addr add "$B4/24" dev tsb0
ip -n "$NS_A" addr add "$A6/64" dev tsa0 nodad
ip -n "$NS_B" addr add "$B6/64" dev tsb0 nodad
ip -n "$NS_A" link set tsa0 up
ip -n "$NS_B" link set tsb0 up
echo "netns: $NS_A ($A4, $A6) <-> $NS_B ($B4, $B6)"
