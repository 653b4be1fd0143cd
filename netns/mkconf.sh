#!/usr/bin/env bash
# Write the setkey files of both hosts for a scenario, with fresh keys and
# SPIs, into DIR: DIR/a.conf and DIR/b.conf. Keys are never kept anywhere
# else; DIR is the caller's (a temporary directory).
#
#   netns/mkconf.sh windows DIR   the seed's Linux-to-Windows style: ESP
#                                 aes-cbc + hmac-sha1 under AH hmac-sha1,
#                                 ICMP/ICMPv6 bypassed, IPv4 and IPv6
#   netns/mkconf.sh linux DIR     the seed's Linux-to-Linux style: IPComp
#                                 deflate, ESP aes-cbc + hmac-sha256, AH
#                                 hmac-sha256, ICMP bypassed
#   netns/mkconf.sh gcm DIR       ESP aes-gcm-16 alone
#   netns/mkconf.sh cbc DIR       ESP aes-cbc + hmac-sha256 alone
#   netns/mkconf.sh gcm-udp DIR   ESP aes-gcm-16 in UDP (RFC 3948, port 4500)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
scenario=${1:?scenario: windows|linux|gcm|cbc|gcm-udp} dir=${2:?output directory}
mkdir -p "$dir"
sas=$(mktemp)
trap 'rm -f "$sas"' EXIT
case "$scenario" in
  windows)
    bundle="esp/transport//require ah/transport//require"
    for pair in "$A4 $B4" "$B4 $A4" "$A6 $B6" "$B6 $A6"; do
      set -- $pair
      echo "add $1 $2 esp $(spi) -r 1024 -E aes-cbc $(key 16) -A hmac-sha1 $(key 20);"
      echo "add $1 $2 ah $(spi) -r 1024 -A hmac-sha1 $(key 20);"
    done > "$sas"
    families="4 6" ;;
  linux)
    bundle="ipcomp/transport//use esp/transport//require ah/transport//require"
    for pair in "$A4 $B4" "$B4 $A4"; do
      set -- $pair
      echo "add $1 $2 ipcomp $(printf '0x%x' $((RANDOM + 0x1000))) -C deflate;"
      echo "add $1 $2 esp $(spi) -r 1024 -E aes-cbc $(key 16) -A hmac-sha256 $(key 32);"
      echo "add $1 $2 ah $(spi) -r 1024 -A hmac-sha256 $(key 32);"
    done > "$sas"
    families="4" ;;
  gcm|cbc|gcm-udp)
    bundle="esp/transport//require"
    for pair in "$A4 $B4" "$B4 $A4" "$A6 $B6" "$B6 $A6"; do
      set -- $pair
      if [ "$scenario" = gcm ]; then
        echo "add $1 $2 esp $(spi) -r 4096 -E aes-gcm-16 $(key 20);"
      elif [ "$scenario" = gcm-udp ]; then
        echo "add $1[4500] $2[4500] esp-udp $(spi) -r 4096 -E aes-gcm-16 $(key 20);"
      else
        echo "add $1 $2 esp $(spi) -r 4096 -E aes-cbc $(key 16) -A hmac-sha256 $(key 32);"
      fi
    done > "$sas"
    families="4 6" ;;
  *) echo "mkconf: unknown scenario $scenario" >&2; exit 2 ;;
esac
for side in a b; do
  if [ $side = a ]; then me4=$A4 peer4=$B4 me6=$A6 peer6=$B6; else me4=$B4 peer4=$A4 me6=$B6 peer6=$A6; fi
  {
    echo "#!/usr/sbin/setkey -f"
    echo "# tunsec netns scenario '$scenario', host $side (generated; fresh keys)"
    echo "flush;"
    echo "spdflush;"
    echo "# Don't require encryption for ICMP"
    echo "spdadd ::/0 ::/0 icmp6 -P out priority 10 none;"
    echo "spdadd ::/0 ::/0 icmp6 -P in priority 10 none;"
    echo "spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P out priority 10 none;"
    echo "spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P in priority 10 none;"
    for f in $families; do
      if [ "$f" = 4 ]; then me=$me4 peer=$peer4; else me=$me6 peer=$peer6; fi
      echo "spdadd $me $peer any -P out ipsec $bundle;"
      echo "spdadd $peer $me any -P in ipsec $bundle;"
    done
    cat "$sas"
  } > "$dir/$side.conf"
  chmod 600 "$dir/$side.conf"
done
