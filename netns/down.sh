#!/usr/bin/env bash
# Tear the topology down (killing anything left running inside it).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
for ns in "$NS_A" "$NS_B"; do
  if ip netns list | grep -qw "$ns"; then
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -n "$pids" ] && kill $pids 2>/dev/null && sleep 0.5
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    ip netns del "$ns"
  fi
done
exit 0
