"""Cases 1 and 2: ESP and AH, every suite, IPv4 and IPv6, both directions.

out: tunsec protects, scapy verifies and decrypts, the result must be the
original packet byte for byte.
in:  scapy protects, tunsec verifies and decrypts, same requirement.
"""

import struct

import pytest
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.ipsec import AH, ESP
from scapy.packet import Padding

from helpers import (
    LINKTYPE_ETHERNET,
    SA,
    SUITES,
    ah_encrypt_manual,
    canonical,
    expect_summary,
    header_chain,
    host_pair,
    ipsec_offset,
    run_tunsec,
    scapy_open,
    scapy_seal,
    scapy_verify_ah,
    tcp_packet,
    traffic_mix,
    udp_packet,
)

FAMILIES = {
    "v4": ("192.0.2.1", "192.0.2.2"),
    "v6": ("2001:db8::1", "2001:db8::2"),
}


def expected_chain(suite, v6):
    chain = ["IPv6" if v6 else "IPv4"]
    protos = [p for p, *_ in suite]
    if "ah" in protos:
        chain.append("AH")
    if "esp" in protos:
        chain.append("ESP")
    return chain


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("suite_name", SUITES)
def test_tunsec_out_scapy_decrypts(work, suite_name, fam):
    a, b = FAMILIES[fam]
    suite = SUITES[suite_name]
    hp = host_pair(a, b, suite)
    cfg = hp.write(work / "a.conf")
    plain = traffic_mix(a, b)
    run = run_tunsec(cfg, "out", plain, work)
    expect_summary(run, read=len(plain), written=len(plain))

    esp = hp.out.get("esp")
    ivs = []
    for i, (got, orig) in enumerate(zip(run.packets, plain)):
        chain = header_chain(got)
        want = expected_chain(suite, fam == "v6")
        if "ESP" not in want:
            want = want + [chain[-1]]
        assert chain[: len(want)] == want, f"packet {i}: header chain {chain}"
        if esp is not None:
            off = ipsec_offset(got, 50)
            iv = got[off + 8: off + 8 + (0 if esp.enc == "null" else 8 if esp.enc != "aes-cbc" else 16)]
            ivs.append(iv)
            if esp.enc in ("aes-gcm-16", "chacha20-poly1305"):
                # RFC 4106 / 7634 IV: tunsec uses the 64-bit sequence number.
                assert iv == struct.pack("!Q", i + 1), f"packet {i}: IV {iv.hex()}"
            # RFC 4303 2.4 padding: 1, 2, 3, ... (checked on scapy's decryption)
            sa = esp.scapy()
            plainesp = sa.crypt_algo.decrypt(sa, ESP(got[off:]), sa.crypt_key, esp.icv_len)
            assert plainesp.padding == bytes(range(1, plainesp.padlen + 1)), f"packet {i}: padding"
        recovered = scapy_open(got, hp.out, seq=i + 1)
        assert recovered == bytes(orig), f"packet {i} ({orig.summary()}) differs after scapy decryption"
    if esp is not None and esp.enc == "aes-cbc":
        assert len(set(ivs)) == len(ivs), "CBC IVs repeat"


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("suite_name", SUITES)
def test_scapy_encrypts_tunsec_in(work, suite_name, fam):
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES[suite_name])
    cfg = hp.write(work / "a.conf")
    plain = traffic_mix(b, a)
    sealed = [scapy_seal(p, hp.inb, seq=i + 1) for i, p in enumerate(plain)]
    run = run_tunsec(cfg, "in", sealed, work)
    expect_summary(run, read=len(plain), written=len(plain))
    for i, (got, orig) in enumerate(zip(run.packets, plain)):
        assert got == bytes(orig), f"packet {i} ({orig.summary()}) differs after tunsec decryption"


@pytest.mark.parametrize("fam", FAMILIES)
def test_ethernet_input_with_link_padding(work, fam):
    """Ethernet frames (small ones padded to 60 bytes) are accepted; the
    output is bare IP with the padding gone."""
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES["esp-aes128cbc-sha1+ah-sha1"])
    cfg = hp.write(work / "a.conf")
    plain = [udp_packet(a, b, 1, 0), tcp_packet(a, b, 2, 1), tcp_packet(a, b, 3, 500), udp_packet(a, b, 4, 3)]
    frames = []
    for i, p in enumerate(plain):
        f = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        if i == 3:
            f = f / Dot1Q(vlan=42)
        f = f / p
        if len(f) < 60:
            f = f / Padding(b"\xee" * (60 - len(f)))
        frames.append(f)
    arp = Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(
        hwsrc="02:00:00:00:00:01", psrc="192.0.2.1", hwdst="00:00:00:00:00:00", pdst="192.0.2.2")
    if fam == "v4":
        assert [len(f) for f in frames[:2]] == [60, 60]  # both carry link padding
    run = run_tunsec(cfg, "out", frames[:2] + [arp] + frames[2:], work, linktype=LINKTYPE_ETHERNET)
    expect_summary(run, read=5, written=4, not_ip=1)
    for i, (got, orig) in enumerate(zip(run.packets, plain)):
        assert scapy_open(got, hp.out, seq=i + 1) == bytes(orig)

    # and inbound, from Ethernet frames
    back = [udp_packet(b, a, 1, 0), tcp_packet(b, a, 2, 900)]
    sealed = [Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / scapy_seal(p, hp.inb, seq=i + 1)
              for i, p in enumerate(back)]
    run = run_tunsec(cfg, "in", sealed, work, linktype=LINKTYPE_ETHERNET)
    expect_summary(run, read=2, written=2)
    assert run.packets == [bytes(p) for p in back]


def test_ah_over_esp_workaround_matches_scapy():
    """The helper that signs AH itself (because scapy's AuthAlgo.sign would
    MAC an inner ESP with the AH key) must produce exactly what scapy
    produces when there is no ESP inside, and a packet scapy verifies when
    there is."""
    a, b = FAMILIES["v4"]
    hp = host_pair(a, b, SUITES["esp-aes128cbc-sha1+ah-sha1"])
    ah, esp = hp.out.get("ah"), hp.out.get("esp")
    for fam in FAMILIES.values():
        p = tcp_packet(fam[0], fam[1], 5, 300)
        ah_f = SA.ah(fam[0], fam[1], 0x77, "hmac-sha256")
        by_scapy = canonical(ah_f.scapy().encrypt(p, seq_num=9))
        mine = ah_encrypt_manual(p, ah_f, 9)
        assert bytes(mine) == bytes(by_scapy)
    p = tcp_packet(a, b, 5, 300)
    inner = canonical(esp.scapy().encrypt(p, seq_num=1))
    signed = ah_encrypt_manual(inner, ah, 1)
    scapy_verify_ah(bytes(signed), ah)
    assert bytes(signed[AH].payload) == bytes(inner[ESP])
