# Shared by the netns scripts: a two-host topology in two network
# namespaces joined by a veth pair, on private test addresses only.
#   host A: namespace tsA, veth tsa0, 10.77.0.1/24 and fd77::1/64
#   host B: namespace tsB, veth tsb0, 10.77.0.2/24 and fd77::2/64
NS_A=${NS_A:-tsA}
NS_B=${NS_B:-tsB}
A4=10.77.0.1 B4=10.77.0.2
A6=fd77::1 B6=fd77::2

# Fresh random key of N bytes, as setkey hex.
key() { echo "0x$(od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n')"; }
# Fresh random SPI above the reserved range.
spi() { printf '0x%08x' $(( ($(od -An -tu4 -N4 /dev/urandom) % 0x7fff0000) + 0x10000 )); }
