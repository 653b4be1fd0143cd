"""Fragmented IPsec reaches the application (issue 11's review finding).

The `gcm` scenario, B's daemon only: A has no tunsec, so what A's
namespace sends goes onto the veth as it is. A 3000-byte UDP datagram to
B's listener is sealed by scapy with the A->B SA's key and arrives in
three fragments, for IPv6 and IPv4:

- written onto A's veth as scapy fragments it (`fragment6`, `fragment`);
- sent by a real sender: a raw ESP socket in A's namespace hands the
  kernel the 3000-byte ESP packet, and the kernel fragments it for the
  1500-byte veth (tunsec itself never sends fragments: its TUN MTU leaves
  room for the worst-case overhead, so sealed packets fit the path);
- with an overlapping fragment: nothing is delivered, the whole datagram is
  dropped and counted as `frag-overlap`.

Before the fix, IPv6 fragments never reached tunsec (the packet filter
refused them) and moved no counter.
"""

import socket
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from e2elib import (
    A4, A6, B4, B6, IFACE_A, IFACE_B, PROTO_ESP, PY, Capture, find_sa, ip_packets, make_topology, mkconf,
    parse_sas, write_pcap,
)

sys.path.insert(0, str(Path(__file__).parent))
from nettool import datagram  # noqa: E402  (what udp-recv checks byte for byte)

SIZE = 3000
PORTS = {"v4": 7401, "v6": 7402}
ADDRS = {"v4": (A4, B4), "v6": (A6, B6)}


# B receives with recvmmsg, then with receive rings (TUNSEC_RXRING=1),
# where an IPv4 datagram the fanout reassembled is larger than a ring's
# frame and comes from the socket's queue in its place.
@pytest.fixture(scope="module", params=["recvmmsg", "ring"])
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "fz")
    a_conf, b_conf = mkconf("gcm", topo.workdir / "conf")
    topo.sas = parse_sas(a_conf)
    env = {"TUNSEC_RXRING": "1"} if request.param == "ring" else None
    topo.db = topo.daemon(topo.b, b_conf, env=env).start()
    assert ("receive rings" in topo.db.log()) == (request.param == "ring"), topo.db.log()
    topo.seq = {"v4": 0, "v6": 0}
    return topo


def seal(net, fam: str, i: int, flow_label: int = 0):
    """Datagram i to B's listener, sealed with the A->B SA (the next
    sequence number of this module's sender)."""
    a, b = ADDRS[fam]
    sa = find_sa(net.sas, a, b, "esp")
    assert sa.enc == "aes-gcm-16"
    net.seq[fam] += 1
    ssa = SecurityAssociation(ESP, spi=sa.spi, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(sa.enc_key[2:]),
                              seq_num=net.seq[fam])
    l3 = IPv6(src=a, dst=b, fl=flow_label) if fam == "v6" else IP(src=a, dst=b, id=0x4000 + i, flags=0)
    plain = l3 / UDP(sport=40000 + i, dport=PORTS[fam]) / Raw(datagram(i, SIZE, b""))
    plain = l3.__class__(bytes(plain))  # checksums and lengths fixed
    return plain.__class__(bytes(ssa.encrypt(plain)))


def scapy_fragments(sealed, fam: str, ident: int) -> list[bytes]:
    raw = bytes(sealed)
    if fam == "v6":
        p = IPv6(raw)
        q = (IPv6(src=p.src, dst=p.dst, hlim=p.hlim, tc=p.tc, fl=p.fl, nh=44) / IPv6ExtHdrFragment(nh=p.nh, id=ident)
             / Raw(raw[40:]))
        frags = [bytes(f) for f in fragment6(q, 1280)]
    else:
        frags = [bytes(f) for f in fragment(IP(raw), 1400)]
    assert len(frags) == 3, f"{len(frags)} fragments"
    return frags


def inject(net, tmp_path, name: str, packets: list[bytes]) -> None:
    eth = Ether(src=net.mac(net.a, IFACE_A), dst=net.mac(net.b, IFACE_B))
    frames = []
    for p in packets:
        l3 = IPv6(p) if p[0] >> 4 == 6 else IP(p)
        frames.append(bytes(eth / l3))
    pcap = write_pcap(tmp_path / f"{name}.pcap", frames)
    assert net.tool(net.a, "inject", "--iface", IFACE_A, str(pcap)).result(30)["sent"] == len(frames)


def listen(net, fam: str, count: int = 1, timeout: float = 10):
    r = net.tool(net.b, "udp-recv", "--bind", ADDRS[fam][1], "--port", str(PORTS[fam]), "--count", str(count),
                 "--timeout", str(timeout))
    r.wait_ready()
    return r


RAW_SEND = """
import socket, sys
fam, dst, hexdata = sys.argv[1], sys.argv[2], sys.argv[3]
af = socket.AF_INET6 if fam == "v6" else socket.AF_INET
s = socket.socket(af, socket.SOCK_RAW, 50)
if af == socket.AF_INET:
    s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: no DF, fragment locally
print(s.sendto(bytes.fromhex(hexdata), (dst, 0)))
"""


@pytest.mark.parametrize("fam", ["v6", "v4"])
def test_scapy_fragments_reach_the_listener(net, tmp_path, fam):
    i = 1
    sealed = seal(net, fam, i)
    frags = scapy_fragments(sealed, fam, 0x5000 + i)
    rx = listen(net, fam)
    c0 = net.db.counters(settle=0)
    cap = Capture(net, net.b, IFACE_B, tmp_path / "b.pcap")
    inject(net, tmp_path, f"frags-{fam}", [frags[2], frags[0], frags[1]])
    got = rx.result(30)
    cap.stop()
    on_wire = [p for p in ip_packets(tmp_path / "b.pcap") if p.dst == ADDRS[fam][1] and p.proto in (44, PROTO_ESP)]
    assert len(on_wire) == 3, f"{len(on_wire)} fragments on B's veth"
    assert got["received"] == [i] and not got["bad"], got
    c = net.db.counters()
    assert c["in_packets"] - c0["in_packets"] == 1, f"{c0.line}\n{c.line}"
    assert c["dropped"] == c0["dropped"], c.line
    # IPv6 fragments reach tunsec one by one; the fanout defragments IPv4.
    assert c["net_rx"] - c0["net_rx"] == (3 if fam == "v6" else 1), f"{c0.line}\n{c.line}"


@pytest.mark.parametrize("fam", ["v6", "v4"])
def test_a_kernel_that_fragments_its_esp(net, tmp_path, fam):
    i = 2
    sealed = seal(net, fam, i)
    esp = bytes(sealed)[40:] if fam == "v6" else bytes(sealed)[20:]
    assert esp[:4] == find_sa(net.sas, *ADDRS[fam], "esp").spi.to_bytes(4, "big")
    rx = listen(net, fam)
    c0 = net.db.counters(settle=0)
    cap = Capture(net, net.a, IFACE_A, tmp_path / "a.pcap")
    sent = net.run(net.a, PY, "-c", RAW_SEND, fam, ADDRS[fam][1], esp.hex())
    assert int(sent.stdout) == len(esp)
    got = rx.result(30)
    cap.stop()
    frags = [p for p in ip_packets(tmp_path / "a.pcap") if p.dst == ADDRS[fam][1] and p.proto in (44, PROTO_ESP)]
    assert len(frags) >= 3, f"the kernel sent {len(frags)} packets, not fragments"
    if fam == "v6":
        assert all(p.proto == 44 and p.ip[40] == PROTO_ESP for p in frags), "IPv6 fragments of ESP"
    else:
        assert all(p.proto == PROTO_ESP for p in frags)
        assert sum(1 for p in frags if int.from_bytes(p.ip[6:8], "big") & 0x3FFF) == len(frags)
    assert got["received"] == [i] and not got["bad"], got
    c = net.db.counters()
    assert c["in_packets"] - c0["in_packets"] == 1, f"{c0.line}\n{c.line}"
    assert c["dropped"] == c0["dropped"], c.line


def test_fragments_of_many_flows_stay_together_in_the_fanout(net, tmp_path):
    """Each worker reassembles alone, so all fragments of a datagram must
    reach the same one. Datagrams with different flow labels spread over
    the workers (the fanout hashes addresses and flow label); a fragment
    hashed apart from its datagram's others would lose that datagram."""
    fam, first, n = "v6", 10, 8
    frags = [scapy_fragments(seal(net, fam, first + k, flow_label=0x1000 * (k + 1)), fam, 0x7000 + k)
             for k in range(n)]
    rx = listen(net, fam, count=n)
    c0 = net.db.counters(settle=0)
    order = [f[j] for j in (2, 0, 1) for f in frags]  # interleaved, last fragments first
    inject(net, tmp_path, "flows", order)
    got = rx.result(30)
    assert got["received"] == list(range(first, first + n)) and not got["bad"], got
    c = net.db.counters()
    assert c["in_packets"] - c0["in_packets"] == n and c["dropped"] == c0["dropped"], f"{c0.line}\n{c.line}"


def test_overlapping_ipv6_fragments_are_dropped_and_counted(net, tmp_path):
    fam, i = "v6", 3
    sealed = seal(net, fam, i)
    frags = scapy_fragments(sealed, fam, 0x5000 + i)
    evil = bytearray(frags[1])
    off = int.from_bytes(evil[42:44], "big")
    evil[42:44] = (off - 8).to_bytes(2, "big")  # 8 bytes over the first fragment
    rx = listen(net, fam, timeout=3)
    c0 = net.db.counters(settle=0)
    inject(net, tmp_path, "overlap", [frags[0], bytes(evil), frags[1], frags[2]])
    got = rx.result(30)
    assert got["received"] == [], got
    c = net.db.counters()
    assert c["frag-overlap"] - c0["frag-overlap"] == 4, f"{c0.line}\n{c.line}"
    assert c["in_packets"] == c0["in_packets"], c.line
    # The next datagram, whole and in order, still gets through.
    sealed = seal(net, fam, i + 1)
    rx = listen(net, fam)
    inject(net, tmp_path, "after", scapy_fragments(sealed, fam, 0x6000))
    assert rx.result(30)["received"] == [i + 1]
