#!/usr/bin/env bash
# Throughput of tunsec between two network namespaces, against plaintext
# over the same veth: iperf3 TCP with one stream and with -P 4, median of
# RUNS runs, CPU seconds per process, and the ratios.
#
#   scripts/bench-netns.sh [SECONDS] [RUNS]     (as root; default 5 s, 3 runs)
#
# Scenarios (SCENARIOS="..." to choose): plaintext; ESP aes-gcm-16; ESP
# aes-gcm-16 in UDP (RFC 3948, sent as UDP GSO super-packets); ESP aes-cbc
# + hmac-sha256; the seed's bundle (ESP aes-cbc + hmac-sha1 under AH
# hmac-sha1). Only the test
# namespaces' private addresses are used; everything is torn down at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5} runs=${2:-3}
# Both "hosts" share this machine's cores: one worker per daemon avoids
# oversubscribing them (WORKERS=N to change).
workers=${WORKERS:-1}
export NS_A=tsbenchA NS_B=tsbenchB
. netns/lib.sh
for t in iperf3 ip; do command -v $t >/dev/null || { echo "bench-netns: needs $t" >&2; exit 1; }; done
cargo build --release --quiet
bin=$PWD/target/release/tunsec
tmp=$(mktemp -d)
cleanup() {
  ip netns pids "$NS_A" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns pids "$NS_B" 2>/dev/null | xargs -r kill 2>/dev/null || true
  sleep 0.5
  netns/down.sh >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
netns/up.sh >/dev/null

# CPU ticks (user+system) of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
hz=$(getconf CLK_TCK)

# One iperf3 run: prints "Gbit/s cpuA cpuB" (CPU seconds of each daemon).
run_iperf() {
  local streams=$1 pa=${2:-} pb=${3:-}
  local a0=0 b0=0
  [ -n "$pa" ] && a0=$(ticks "$pa")
  [ -n "$pb" ] && b0=$(ticks "$pb")
  local out
  out=$(ip netns exec "$NS_A" iperf3 -c "$B4" -p 5201 -t "$secs" -P "$streams" -J 2>/dev/null)
  local gbps
  gbps=$(printf '%s' "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))')
  local ca=0 cb=0
  [ -n "$pa" ] && ca=$(( $(ticks "$pa") - a0 ))
  [ -n "$pb" ] && cb=$(( $(ticks "$pb") - b0 ))
  echo "$gbps $(awk -v t=$ca -v h=$hz 'BEGIN{printf "%.2f", t/h}') $(awk -v t=$cb -v h=$hz 'BEGIN{printf "%.2f", t/h}')"
}

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

ip netns exec "$NS_B" iperf3 -s -D -p 5201 >/dev/null 2>&1
sleep 0.5

declare -A result
printf '%-34s %8s %10s %10s %10s\n' "scenario" "streams" "Gbit/s" "vs plain" "CPU s A/B"
plain1=""; plain4=""
for sc in ${SCENARIOS:-plaintext gcm gcm-udp cbc windows}; do
  pa="" pb=""
  if [ "$sc" != plaintext ]; then
    netns/mkconf.sh "$sc" "$tmp/$sc" >/dev/null
    ip netns exec "$NS_A" "$bin" run -c "$tmp/$sc/a.conf" --tun tsec0 --workers "$workers" --control "/run/tunsec/$NS_A.sock" >"$tmp/$sc.a.log" 2>&1 &
    pa=$!
    ip netns exec "$NS_B" "$bin" run -c "$tmp/$sc/b.conf" --tun tsec0 --workers "$workers" --control "/run/tunsec/$NS_B.sock" >"$tmp/$sc.b.log" 2>&1 &
    pb=$!
    sleep 1.5
  fi
  for streams in 1 4; do
    vals=(); cpus=()
    for _ in $(seq "$runs"); do
      r=$(run_iperf "$streams" "$pa" "$pb")
      vals+=("${r%% *}"); cpus+=("${r#* }")
    done
    med=$(printf '%s\n' "${vals[@]}" | median)
    cpu=${cpus[0]}
    if [ "$sc" = plaintext ]; then
      [ "$streams" = 1 ] && plain1=$med || plain4=$med
      ratio="1"
      cpu="-"
    else
      base=$([ "$streams" = 1 ] && echo "$plain1" || echo "$plain4")
      ratio=$(awk -v a="$med" -v b="$base" 'BEGIN{printf "1/%.1f", b/a}')
    fi
    label=$sc
    case $sc in
      gcm) label="esp aes-gcm-16" ;;
      gcm-udp) label="esp-in-udp aes-gcm-16 (GSO)" ;;
      cbc) label="esp aes-cbc + hmac-sha256" ;;
      windows) label="seed: esp aes-cbc/sha1 + ah sha1" ;;
    esac
    printf '%-34s %8s %10s %10s %10s\n' "$label" "$streams" "$med" "$ratio" "$cpu"
  done
  if [ -n "$pa" ]; then
    kill "$pa" "$pb" 2>/dev/null || true
    wait "$pa" "$pb" 2>/dev/null || true
    if grep -q "dropped [1-9]" "$tmp/$sc.b.log"; then grep "final counters" "$tmp/$sc.b.log" | sed 's/^.*final/  B: final/'; fi
  fi
done
echo "(median of $runs runs of $secs s; CPU = seconds of user+system time of each daemon during the first run; $(nproc) CPUs; $(date -u +%F))"
