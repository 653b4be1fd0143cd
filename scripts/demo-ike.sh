#!/usr/bin/env bash
# tunsec keyed by an unmodified IKE daemon: two hosts in two network
# namespaces, each running `tunsec run --xfrm` and strongSwan's charon
# through `tunsec ike`, so charon's XFRM netlink reaches tunsec instead of
# the kernel. IKEv2 with a PSK negotiates an ESP aes-gcm-16 transport-mode
# child; tunsec carries the traffic (iperf3, tcpdump shows charon's SPI);
# the kernel's SAD stays empty; a rekey and a terminate go through too.
# tunsec's own setkey file keeps ICMP bypassed, as the seed does.
# Needs root; installs strongSwan (charon, swanctl), iperf3 and tcpdump via
# apt if they are missing. See docs/ike.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo-ike: run as root (network namespaces, TUN devices)" >&2; exit 1; }
charon=/usr/lib/ipsec/charon
missing=()
for t in iperf3 tcpdump ping nft swanctl; do command -v $t >/dev/null || missing+=("$t"); done
[ -x "$charon" ] || missing+=(charon)
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" |
    sed 's/^ping$/iputils-ping/; s/^nft$/nftables/; s/^swanctl$/strongswan-swanctl/; s/^charon$/strongswan-charon/' |
    tr '\n' ' ')
  echo "demo-ike: installing $pkgs"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi
. netns/lib.sh
echo "== building tunsec and libtunsec_xfrm.so (release)"
cargo build --release --quiet
bin=$PWD/target/release/tunsec
tmp=$(mktemp -d)
chmod 755 "$tmp"
declare -A tunsec_pid=() charon_pid=()
other_pids=()
cleanup() {
  set +e
  for p in "${charon_pid[@]}" "${other_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${charon_pid[@]}" "${other_pids[@]}"; do wait "$p" 2>/dev/null; done
  for p in "${tunsec_pid[@]}"; do kill -INT "$p" 2>/dev/null; done
  for p in "${tunsec_pid[@]}"; do wait "$p" 2>/dev/null; done
  netns/down.sh >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP
# swanctl's harmless noise: plugins it cannot load, certificate folders it
# does not find beside the file.
quiet() { grep -vE 'plugin .* failed to load|opening directory .* failed|^loaded plugins' || true; }
indent() { sed 's/^/   /'; }
swanctl_a() { swanctl "$@" --uri "unix://$tmp/A/charon.vici" 2>&1 | quiet; }
spis() { swanctl_a --list-sas | awk '$1=="in"||$1=="out"{sub(",","",$2); printf "%s_%s ", $2, ($1=="in"?"i":"o")}'; }
sad() { "$bin" setkey --control "$tmp/a.sock" -D; }
# Is SPI (hex, as swanctl prints it) in tunsec's SAD on A? (No grep -q on a
# pipe: with pipefail, the writer's SIGPIPE would fail the test.)
has_spi() { local s; s=$(sad); grep -q "(0x$(printf %x "0x$1"))" <<<"$s"; }

echo "== two hosts: $NS_A ($A4) and $NS_B ($B4), joined by a veth pair"
netns/up.sh >/dev/null

# tunsec's own policies: only the seed's ICMP bypass. charon adds the rest.
cat >"$tmp/bypass.conf" <<'EOF'
spdadd ::/0 ::/0 icmp6 -P out priority 10 none;
spdadd ::/0 ::/0 icmp6 -P in priority 10 none;
spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P out priority 10 none;
spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P in priority 10 none;
EOF
# Per side: strongswan.conf (charon's plugins, log, vici socket) and
# swanctl.conf (the connection: IKEv2, PSK, an ESP aes-gcm-16 transport child).
side() { # NAME LOCAL REMOTE
  local d=$tmp/$1
  mkdir -p "$d"
  cat >"$d/strongswan.conf" <<EOF
charon {
  load_modular = no
  load = random nonce openssl aes sha1 sha2 hmac gcm pem pkcs1 x509 pubkey curve25519 kdf socket-default kernel-netlink vici
  install_virtual_ip = no
  install_routes = no
  filelog { log { path = $d/charon.log
                  default = 1
                  knl = 2
                  flush_line = yes } }
  plugins { kernel-netlink { timeout = 5000
                             retries = 2 }
            vici { socket = unix://$d/charon.vici } }
}
EOF
  cat >"$d/swanctl.conf" <<EOF
connections {
  host {
    version = 2
    local_addrs = $2
    remote_addrs = $3
    proposals = aes128-sha256-x25519
    local { auth = psk
            id = $2 }
    remote { auth = psk
             id = $3 }
    children {
      gcm { local_ts = $2/32
            remote_ts = $3/32
            mode = transport
            esp_proposals = aes128gcm16
            start_action = none }
    }
  }
}
secrets { ike-1 { id-1 = $2
                  id-2 = $3
                  secret = "a demo secret, not a real one" } }
EOF
}
side A "$A4" "$B4"
side B "$B4" "$A4"

echo "== tunsec run --xfrm in each namespace (config: the ICMP bypass only)"
for s in A B; do
  ns=NS_$s
  ip netns exec "${!ns}" "$bin" run -c "$tmp/bypass.conf" --tun tsc0 --workers 1 \
    --control "$tmp/${s,,}.sock" --xfrm "$tmp/${s,,}.xfrm" >"$tmp/${s,,}.log" 2>&1 &
  tunsec_pid[$s]=$!
done
for _ in $(seq 100); do
  grep -q " up: " "$tmp/a.log" && grep -q " up: " "$tmp/b.log" && [ -S "$tmp/a.xfrm" ] && [ -S "$tmp/b.xfrm" ] && break
  sleep 0.1
done
[ -S "$tmp/a.xfrm" ] && [ -S "$tmp/b.xfrm" ] || { cat "$tmp"/[ab].log >&2; echo "demo-ike: tunsec did not start" >&2; exit 1; }
grep -h " up: " "$tmp/a.log" "$tmp/b.log" | sed -E 's/\x1b\[[0-9;]*m//g; s/^.*INFO +/   /; s/, peers .*//'

echo "== charon in each namespace through tunsec ike (its XFRM netlink goes to tunsec)"
for s in A B; do
  ns=NS_$s
  # charon keeps its pid file and sockets under /run: a private one each.
  ip netns exec "${!ns}" env STRONGSWAN_CONF="$tmp/$s/strongswan.conf" \
    "$bin" ike --xfrm "$tmp/${s,,}.xfrm" -- \
    unshare --mount --propagation private sh -c \
    "mount -t tmpfs -o mode=0755 tmpfs /run && exec $charon" >"$tmp/$s/charon.out" 2>&1 &
  charon_pid[$s]=$!
done
for _ in $(seq 100); do [ -S "$tmp/A/charon.vici" ] && [ -S "$tmp/B/charon.vici" ] && break; sleep 0.1; done
for s in A B; do
  [ -S "$tmp/$s/charon.vici" ] || { cat "$tmp/$s/charon.out" "$tmp/$s/charon.log" >&2; echo "demo-ike: charon $s did not start" >&2; exit 1; }
  out=$(swanctl --load-all --file "$tmp/$s/swanctl.conf" --uri "unix://$tmp/$s/charon.vici" 2>&1) ||
    { quiet <<<"$out" >&2; echo "demo-ike: FAILED: swanctl --load-all on $s" >&2; exit 1; }
  quiet <<<"$out" | grep -E "loaded (connection|ike secret)" | sed "s/^/   $s: /"
done

echo "== swanctl --initiate --child gcm (on $NS_A)"
out=$(swanctl_a --initiate --child gcm --timeout 15) || true
grep -E 'established|failed' <<<"$out" | indent || true
echo "== swanctl --list-sas (on $NS_A)"
swanctl_a --list-sas | indent
read -r spi_in spi_out <<<"$(spis)"
[ -n "${spi_out:-}" ] || { echo "demo-ike: FAILED: no CHILD_SA" >&2; tail -30 "$tmp/A/charon.log" >&2; exit 1; }
echo "== tunsec setkey -D on $NS_A: the same SPIs, in tunsec's SAD"
sad | indent
has_spi "${spi_out%_o}" || { echo "demo-ike: FAILED: $spi_out not in tunsec's SAD" >&2; exit 1; }
echo "== tunsec setkey -DP on $NS_A: charon's policies beside the ICMP bypass"
"$bin" setkey --control "$tmp/a.sock" -DP | indent
echo "== the kernel's SAD in $NS_A (ip xfrm state): empty"
kstate=$(ip netns exec "$NS_A" ip xfrm state)
echo "   ${kstate:-(nothing)}"
[ -z "$kstate" ] || { echo "demo-ike: FAILED: SAs in the kernel" >&2; exit 1; }
echo "== tunsec ike -- ip xfrm state (ip's XFRM netlink goes to tunsec; keys hidden here)"
ip netns exec "$NS_A" "$bin" ike --xfrm "$tmp/a.xfrm" -- ip xfrm state |
  sed -E 's/0x[0-9a-f]{16,}/<key>/g' | indent

ip netns exec "$NS_B" iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
other_pids+=($!)
echo "== ping $B4 (ICMP is bypassed: in the clear)"
ip netns exec "$NS_A" timeout 10 tcpdump -ni tsa0 -c 2 -w "$tmp/icmp.pcap" icmp >/dev/null 2>&1 &
td=$!; other_pids+=($td)
sleep 0.5
out=$(ip netns exec "$NS_A" ping -c 2 -i 0.2 -W 2 "$B4") || { echo "demo-ike: FAILED: ping" >&2; exit 1; }
tail -2 <<<"$out" | indent
wait "$td" || true
tcpdump -nr "$tmp/icmp.pcap" 2>/dev/null | cut -d' ' -f2- | indent

echo "== TCP $NS_A -> $NS_B (iperf3, 3 s), protected by tunsec with charon's SA"
ip netns exec "$NS_A" timeout 10 tcpdump -ni tsa0 -c 4 -w "$tmp/esp.pcap" esp >/dev/null 2>&1 &
td=$!; other_pids+=($td)
sleep 0.5
out=$(ip netns exec "$NS_A" iperf3 -c "$B4" -p 5201 -t 3) || { echo "demo-ike: FAILED: iperf3" >&2; exit 1; }
grep -E 'receiver' <<<"$out" | indent
wait "$td" || true
echo "== on the wire (tcpdump -n on $NS_A's veth): ESP with charon's outbound SPI 0x${spi_out%_o}"
tcpdump -nr "$tmp/esp.pcap" 2>/dev/null | cut -d' ' -f2- | indent
grep -q "ESP(spi=0x${spi_out%_o}," <<<"$(tcpdump -nr "$tmp/esp.pcap" 2>/dev/null)" ||
  { echo "demo-ike: FAILED: no ESP with spi 0x${spi_out%_o} on the wire" >&2; exit 1; }

echo "== swanctl --rekey --child gcm: new SPIs in charon and in tunsec"
out=$(swanctl_a --rekey --child gcm) || true
grep -E 'rekey' <<<"$out" | indent || true
for _ in $(seq 50); do
  read -r new_in new_out <<<"$(spis)"
  [ -n "${new_out:-}" ] && [ "$new_out" != "$spi_out" ] && [ "$new_in" != "$spi_in" ] &&
    ! has_spi "${spi_out%_o}" && has_spi "${new_out%_o}" && break
  sleep 0.1
done
echo "   before: $spi_in $spi_out  after: ${new_in:-?} ${new_out:-?}"
[ "${new_out:-}" != "$spi_out" ] || { echo "demo-ike: FAILED: no rekey" >&2; exit 1; }
sad | grep -E '^[0-9a-f.:]+ [0-9a-f.:]+$|spi=' | indent
has_spi "${new_out%_o}" || { echo "demo-ike: FAILED: $new_out not in tunsec's SAD" >&2; exit 1; }

echo "== swanctl --terminate --ike host: tunsec's SAD is empty again"
out=$(swanctl_a --terminate --ike host --timeout 10) || true
grep -E 'terminate' <<<"$out" | indent || true
empty() { local s; s=$(sad); grep -q "No SAD entries" <<<"$s"; }
for _ in $(seq 50); do empty && break; sleep 0.1; done
sad | indent
empty || { echo "demo-ike: FAILED: SAs left in tunsec" >&2; exit 1; }
echo "== demo-ike OK"
