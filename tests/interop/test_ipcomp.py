"""Case 4: IPComp (RFC 3173, raw DEFLATE) in an ipcomp+esp+ah bundle.

out: tunsec compresses/encrypts/signs; scapy strips AH and ESP, Python's
zlib inflates the IPComp payload. Payloads under 90 bytes and payloads that
do not shrink must be sent without an IPComp header.
in:  Python deflates and wraps, scapy adds ESP and AH, tunsec restores.
"""

import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw
from scapy.layers.inet6 import IPv6

from helpers import (
    PROTO_IPCOMP,
    SA,
    Bundle,
    HostPair,
    ah_encrypt_manual,
    canonical,
    deflate_raw,
    expect_summary,
    header_chain,
    icmp_echo,
    ipcomp_compress,
    ipcomp_decompress,
    parse_ip,
    rule_string,
    run_tunsec,
    scapy_open,
    scapy_seal,
    setkey_text,
    tcp_packet,
    udp_packet,
)

FAMILIES = {
    "v4": ("192.0.2.1", "192.0.2.2"),
    "v6": ("2001:db8::1", "2001:db8::2"),
}


def comp_bundle(src, dst, spi_base, raw_cpi=False):
    return Bundle(
        src,
        dst,
        [
            SA.ipcomp(src, dst, 0x3001 if raw_cpi else spi_base + 3, raw_cpi=raw_cpi),
            SA.esp(src, dst, spi_base + 1, "aes-cbc", 128, "hmac-sha256"),
            SA.ah(src, dst, spi_base + 2, "hmac-sha1"),
        ],
    )


def comp_pair(a, b, raw_cpi=False):
    return HostPair(a, b, comp_bundle(a, b, 0x5000, raw_cpi), comp_bundle(b, a, 0x6000, raw_cpi))


def transport_len(p):
    b = bytes(p)
    if isinstance(p, IP):
        return len(b) - (b[0] & 0xF) * 4
    return len(b) - 40


def zeros_udp(src, dst, n):
    extra = {} if ":" in src else {"id": 0x3333}
    pkt = (IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst, **extra)) / UDP(sport=9, dport=9)
    return canonical(pkt / Raw(b"\0" * n))


def cases(src, dst):
    """(packet, must it be compressed?)"""
    c = [
        (udp_packet(src, dst, 1, 50), False),  # 58 bytes from the UDP header on: too small
        (zeros_udp(src, dst, 81), False),  # 89 bytes, very compressible: still below the threshold
        (tcp_packet(src, dst, 3, 40), False),  # 60 bytes
        (tcp_packet(src, dst, 4, 1400, rnd=True), False),  # incompressible
        (udp_packet(src, dst, 5, 300, rnd=True), False),  # incompressible
        (tcp_packet(src, dst, 6, 1400), True),  # text: compresses well
        (udp_packet(src, dst, 7, 200), True),
        (icmp_echo(src, dst, 8, 1000), True),
        (udp_packet(src, dst, 9, 8000), True),  # ~8000 bytes
        (zeros_udp(src, dst, 120), True),
    ]
    assert transport_len(c[0][0]) < 90 and transport_len(c[1][0]) == 89
    assert len(deflate_raw(bytes(c[1][0])[-89:])) < 30  # it would shrink a lot
    return c


@pytest.mark.parametrize("raw_cpi", [False, True], ids=["cpi2", "cpi-R"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_tunsec_compresses_python_inflates(work, fam, raw_cpi):
    a, b = FAMILIES[fam]
    hp = comp_pair(a, b, raw_cpi)
    cfg = hp.write(work / "a.conf")
    assert rule_string(hp.out.protos) in cfg.read_text()
    cs = cases(a, b)
    plain = [p for p, _ in cs]
    run = run_tunsec(cfg, "out", plain, work)
    expect_summary(run, read=len(plain), written=len(plain))
    comp = hp.out.get("ipcomp")
    assert comp.wire_cpi == (0x3001 if raw_cpi else 2)
    for i, ((orig, compressed), got) in enumerate(zip(cs, run.packets)):
        assert header_chain(got) == [("IPv6" if fam == "v6" else "IPv4"), "AH", "ESP"], i
        # scapy removes AH and ESP, zlib inflates (checks CPI, flags, stream end)
        recovered = scapy_open(got, hp.out, seq=i + 1, ipcomp_expected=compressed)
        assert recovered == bytes(orig), f"packet {i}: {orig.summary()}"
        if compressed:
            # and the compressed packet really is smaller
            assert len(inner_after_esp(got, hp)) < len(bytes(orig)), f"packet {i} did not shrink"


def inner_after_esp(got, hp):
    """scapy strips AH and ESP; returns the bytes with the IPComp header."""
    pkt = parse_ip(got)
    for sa in (hp.out.get("ah"), hp.out.get("esp")):
        pkt = parse_ip(bytes(sa.scapy().decrypt(pkt)))
    return bytes(pkt)


@pytest.mark.parametrize("fam", FAMILIES)
def test_ipcomp_header_fields(work, fam):
    """IPComp header: next header = the original protocol, flags 0, CPI 2;
    compressed data is a complete raw DEFLATE stream."""
    a, b = FAMILIES[fam]
    hp = comp_pair(a, b)
    cfg = hp.write(work / "a.conf")
    orig = tcp_packet(a, b, 1, 1000)
    run = run_tunsec(cfg, "out", [orig], work)
    inner = inner_after_esp(run.packets[0], hp)
    if fam == "v4":
        ihl = (inner[0] & 0xF) * 4
        assert inner[9] == PROTO_IPCOMP
        hdr = inner[ihl: ihl + 4]
        assert struct.unpack("!H", inner[2:4])[0] == len(inner)
    else:
        assert inner[6] == PROTO_IPCOMP
        hdr = inner[40:44]
        assert struct.unpack("!H", inner[4:6])[0] == len(inner) - 40
    assert hdr == bytes([6, 0, 0, 2]), hdr.hex()


@pytest.mark.parametrize("fam", FAMILIES)
def test_python_compresses_tunsec_inflates(work, fam):
    a, b = FAMILIES[fam]
    hp = comp_pair(a, b)
    cfg = hp.write(work / "a.conf")
    cs = cases(b, a)
    plain = [p for p, _ in cs]
    sealed = []
    for i, (p, compressible) in enumerate(cs):
        # Compress what shrinks (as a sender should) and also one small
        # packet (a sender may): tunsec must take both.
        deflate = compressible or i == 2
        s = scapy_seal(p, hp.inb, seq=i + 1, deflate=deflate)
        sealed.append(s)
    run = run_tunsec(cfg, "in", sealed, work)
    expect_summary(run, read=len(plain), written=len(plain))
    for i, (got, orig) in enumerate(zip(run.packets, plain)):
        assert got == bytes(orig), f"packet {i}: {orig.summary()}"


@pytest.mark.parametrize("fam", FAMILIES)
def test_corrupt_deflate_is_dropped(work, fam):
    a, b = FAMILIES[fam]
    hp = comp_pair(a, b)
    cfg = hp.write(work / "a.conf")
    good = udp_packet(b, a, 1, 500)
    comp = ipcomp_compress(good)
    raw = bytes(comp)
    off = (raw[0] & 0xF) * 4 if fam == "v4" else 40
    truncated = canonical((IP if fam == "v4" else IPv6)(raw[: len(raw) - 10]))
    if fam == "v4":
        del truncated.len, truncated.chksum
    else:
        del truncated.plen
    bad_stream = raw[: off + 4] + b"\xff" * (len(raw) - off - 4)  # invalid block type
    bad = canonical((IP if fam == "v4" else IPv6)(bad_stream))
    esp, ah = hp.inb.get("esp"), hp.inb.get("ah")
    def wrap(p, seq):
        return ah_encrypt_manual(canonical(esp.scapy().encrypt(p, seq_num=seq)), ah, seq)

    pkts = [wrap(canonical(truncated), 1), wrap(bad, 2), scapy_seal(good, hp.inb, seq=3, deflate=True)]
    run = run_tunsec(cfg, "in", pkts, work)
    expect_summary(run, read=3, written=1, decompress=2)
    assert run.packets == [bytes(good)]


def test_ipcomp_only_policy_and_setkey_text(work):
    """An ipcomp-only bundle (`use`): compressible traffic gets IPComp and
    nothing else; small traffic leaves unchanged."""
    a, b = FAMILIES["v4"]
    comp = SA.ipcomp(a, b, 0x4444)
    text = setkey_text([comp], [f"spdadd {a} {b} any -P out ipsec ipcomp/transport//use"])
    cfg = work / "a.conf"
    cfg.write_text(text)
    big, small = udp_packet(a, b, 1, 2000), udp_packet(a, b, 2, 10)
    run = run_tunsec(cfg, "out", [big, small], work)
    expect_summary(run, read=2, written=2)
    assert header_chain(run.packets[0]) == ["IPv4", "IPCOMP"]
    assert ipcomp_decompress(run.packets[0], 2) == bytes(big)
    assert run.packets[1] == bytes(small)
