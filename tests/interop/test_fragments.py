"""Fragmented IPsec: scapy seals a 3000-byte datagram, fragments it (scapy's
`fragment` for IPv4, `fragment6` for IPv6, as a kernel sending over a
1280/1500-byte path would), and `tunsec pcap --direction in` must reassemble
it, verify it and give back the original; overlapping fragments must drop
the datagram (RFC 5722) and be counted.
"""

import pytest
from scapy.layers.inet import IP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.packet import Raw

from helpers import SUITES, expect_summary, host_pair, run_tunsec, scapy_seal, udp_packet

FAMILIES = {
    "v4": ("192.0.2.1", "192.0.2.2"),
    "v6": ("2001:db8::1", "2001:db8::2"),
}


def split(sealed, v6: bool, ident: int) -> list[bytes]:
    """Fragments of a sealed packet, three for 3000 bytes. IPv4 keeps its
    identification (AH covers it); IPv6 gets a fragment header with
    `ident` after the IPv6 header."""
    raw = bytes(sealed)
    if v6:
        p = IPv6(raw)
        q = (IPv6(src=p.src, dst=p.dst, hlim=p.hlim, tc=p.tc, fl=p.fl, nh=44)
             / IPv6ExtHdrFragment(nh=p.nh, id=ident) / Raw(raw[40:]))
        frags = fragment6(q, 1280)
    else:
        frags = fragment(IP(raw), 1400)
    return [bytes(f) for f in frags]


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("suite_name", ["esp-aes128gcm16", "esp-aes128cbc-sha1+ah-sha1"])
def test_scapy_fragments_are_reassembled_and_opened(work, fam, suite_name):
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES[suite_name])
    cfg = hp.write(work / "a.conf")
    plain = [udp_packet(b, a, i, 3000, rnd=True) for i in range(2)]
    sealed = [scapy_seal(p, hp.inb, seq=i + 1) for i, p in enumerate(plain)]
    f0 = split(sealed[0], fam == "v6", 0x1111)
    f1 = split(sealed[1], fam == "v6", 0x2222)
    assert len(f0) == len(f1) == 3
    # out of order and interleaved
    feed = [f0[2], f1[1], f0[0], f1[0], f0[1], f1[2]]
    run = run_tunsec(cfg, "in", feed, work)
    expect_summary(run, read=6, written=2)
    assert (run.summary.reassembled, run.summary.fragments) == (2, 6), run.stderr
    assert run.packets == [bytes(plain[0]), bytes(plain[1])]


@pytest.mark.parametrize("fam", FAMILIES)
def test_overlapping_fragments_drop_the_datagram(work, fam):
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES["esp-aes128gcm16"])
    cfg = hp.write(work / "a.conf")
    plain = udp_packet(b, a, 1, 3000, rnd=True)
    sealed = scapy_seal(plain, hp.inb, seq=1)
    frags = split(sealed, fam == "v6", 0x3333)
    # the middle fragment again, 8 bytes earlier: it overlaps the first
    evil = bytearray(frags[1])
    if fam == "v6":
        off = int.from_bytes(evil[42:44], "big")
        evil[42:44] = (off - 8).to_bytes(2, "big")
    else:
        p = IP(bytes(evil))
        p.frag -= 1
        del p.chksum
        evil = bytearray(bytes(p))
    run = run_tunsec(cfg, "in", [frags[0], bytes(evil), frags[1], frags[2]], work)
    # the first (held), the overlapping one, and the two that come after
    expect_summary(run, read=4, written=0, frag_overlap=4)


def test_tunsec_sealed_fragments_round_trip(work):
    """tunsec seals (out), scapy fragments, tunsec opens (in, as the peer)."""
    a, b = FAMILIES["v6"]
    hp = host_pair(a, b, SUITES["esp-aes256gcm16+ah-sha256"])
    cfg_a = hp.write(work / "a.conf")
    cfg_b = hp.mirror().write(work / "b.conf")
    plain = [udp_packet(a, b, i, 3000 + 500 * i, rnd=True) for i in range(3)]
    out = run_tunsec(cfg_a, "out", plain, work)
    expect_summary(out, read=3, written=3)
    frags = [f for i, s in enumerate(out.packets) for f in split(s, True, 0x100 + i)]
    back = run_tunsec(cfg_b, "in", list(reversed(frags)), work)
    expect_summary(back, read=len(frags), written=3)
    assert sorted(back.packets) == sorted(bytes(p) for p in plain)
