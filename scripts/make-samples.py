#!/usr/bin/env python3
"""Write the plaintext sample captures shipped in tests/data/ (run once;
the outputs are committed). Needs scapy.

seed-a.pcap: traffic from the seed's Linux host (172.17.207.12 /
2001:470:1f09:11ed::c) to its Windows peer (.66 / ::42): a TCP exchange
carrying a marker string, UDP, ICMP echo and ICMPv6 echo.
seed-b.pcap: the peer's replies.
"""
import sys
from scapy.all import IP, IPv6, TCP, UDP, ICMP, ICMPv6EchoRequest, ICMPv6EchoReply, Raw, wrpcap

A4, B4 = "172.17.207.12", "172.17.207.66"
A6, B6 = "2001:470:1f09:11ed::c", "2001:470:1f09:11ed::42"
MARK = b"TUNSEC-SAMPLE-MARKER "


def conv(src4, dst4, src6, dst6, sport, dport, t0):
    pkts = []
    text = (MARK + b"the quick brown fox jumps over the lazy dog. ") * 28
    for i in range(4):
        pkts.append(IP(src=src4, dst=dst4, id=100 + i) / TCP(sport=sport, dport=dport, flags="PA", seq=1000 + i * 1200) / Raw(text[: 200 + i * 300]))
        pkts.append(IPv6(src=src6, dst=dst6) / TCP(sport=sport, dport=dport, flags="PA", seq=5000 + i * 1200) / Raw(text[: 100 + i * 350]))
    pkts.append(IP(src=src4, dst=dst4, id=200) / UDP(sport=5353, dport=53) / Raw(MARK + b"udp"))
    pkts.append(IP(src=src4, dst=dst4, id=201) / ICMP(type=8, id=7, seq=1) / Raw(b"ping " * 8))
    pkts.append(IPv6(src=src6, dst=dst6) / ICMPv6EchoRequest(id=7, seq=1, data=b"ping6 " * 8))
    out = []
    for i, p in enumerate(pkts):
        p = p.__class__(bytes(p))  # fix checksums and lengths
        p.time = t0 + i * 0.01
        out.append(p)
    return out


def main(outdir):
    wrpcap(f"{outdir}/seed-a.pcap", conv(A4, B4, A6, B6, 40000, 22, 1700000000.0), linktype=101)
    wrpcap(f"{outdir}/seed-b.pcap", conv(B4, A4, B6, A6, 22, 40000, 1700000000.005), linktype=101)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
