"""Case 6: what tunsec must refuse, from scapy-built packets that are then
tampered with. Every run asserts the exact summary line and the exact
packets that got through.
"""

import hashlib
import hmac
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, PadN
from scapy.layers.ipsec import ESP, _ESPPlain
from scapy.packet import Raw

from helpers import (
    SA,
    SUITES,
    Bundle,
    canonical,
    expect_summary,
    fix_ipv4_checksum,
    flip,
    host_pair,
    icmp_echo,
    ipsec_offset,
    parse_ip,
    run_tunsec,
    scapy_open,
    scapy_seal,
    tcp_packet,
    udp_packet,
)

FAMILIES = {
    "v4": ("192.0.2.1", "192.0.2.2"),
    "v6": ("2001:db8::1", "2001:db8::2"),
}


def set_ip_len(b: bytes) -> bytes:
    """Make the IP length field match the (cut) packet."""
    x = bytearray(b)
    if x[0] >> 4 == 4:
        x[2:4] = len(x).to_bytes(2, "big")
        return fix_ipv4_checksum(bytes(x))
    x[4:6] = (len(x) - 40).to_bytes(2, "big")
    return bytes(x)


@pytest.mark.parametrize("fam", FAMILIES)
def test_esp_replay_window_tamper_unknown_spi_truncation(work, fam):
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES["esp-aes256cbc-sha256"], replay=32)
    cfg = hp.write(work / "a.conf")
    assert "-r 32" in cfg.read_text()
    bundle = hp.inb
    esp = bundle.get("esp")
    p = {n: tcp_packet(b, a, n, 100 + n) for n in (1, 2, 3, 5, 8, 9, 40, 41)}

    def seal(n, seq=None):
        return bytes(scapy_seal(p[n], bundle, seq=seq or n))

    s3 = seal(3)
    off = ipsec_offset(s3, 50)
    stranger = SA.esp(b, a, 0xDEAD, "aes-cbc", 256, "hmac-sha256")
    stranger.enc_key, stranger.auth_key = esp.enc_key, esp.auth_key  # same keys, SPI unknown to tunsec
    s41 = seal(41)
    pkts = [
        seal(1),  # ok
        seal(2),  # ok
        seal(2),  # replay
        flip(s3, off + 8 + 16 + 5),  # ciphertext bit: icv-failure
        s3,  # ok: a failed ICV did not move the window
        seal(40),  # ok
        seal(5),  # 40 - 5 = 35 >= 32: replay-old
        seal(8),  # 40 - 8 = 32: just left of the window: replay-old
        seal(9),  # 40 - 9 = 31: inside, unseen: ok
        seal(40),  # replay
        flip(s41, len(s41) - 1),  # ICV bit: icv-failure
        bytes(scapy_seal(p[41], Bundle(b, a, [stranger]), seq=41)),  # unknown-spi
        set_ip_len(s41[: off + 6]),  # ESP header cut short: malformed
        s41[: len(s41) - 20],  # capture shorter than the IP length: malformed
        set_ip_len(s41[: len(s41) - 21]),  # ciphertext not block aligned: malformed
    ]
    run = run_tunsec(cfg, "in", pkts, work)
    expect_summary(run, read=15, written=5, malformed=3, unknown_spi=1, icv_failure=2, replay=2, replay_old=2)
    assert run.packets == [bytes(p[n]) for n in (1, 2, 3, 40, 9)]


@pytest.mark.parametrize("fam", FAMILIES)
def test_ah_mutable_and_immutable_fields(work, fam):
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES["ah-sha1"])
    cfg = hp.write(work / "a.conf")
    bundle = hp.inb
    v4 = fam == "v4"
    p1, p2, p3 = (udp_packet(b, a, n, 64 * n) for n in (1, 2, 3))
    s1 = bytes(scapy_seal(p1, bundle, seq=1))
    s2 = bytes(scapy_seal(p2, bundle, seq=2))
    s3 = bytes(scapy_seal(p3, bundle, seq=3))
    ah_off = ipsec_offset(s2, 51)

    def edit(s, at, val):
        x = bytearray(s)
        x[at: at + len(val)] = val
        return fix_ipv4_checksum(bytes(x))

    if v4:
        immutable = edit(s2, 4, b"\x77\x77")  # IPv4 identification
        mutable = edit(s2, 1, b"\xb8")  # TOS
        mutable = edit(mutable, 6, b"\x40")  # DF
        mutable = edit(mutable, 8, b"\x05")  # TTL
        expect2 = bytearray(bytes(p2))
        expect2[1], expect2[6], expect2[8] = 0xB8, 0x40, 0x05
        expect2 = fix_ipv4_checksum(bytes(expect2))
    else:
        immutable = edit(s2, 8 + 15, b"\x99")  # a byte of the source address
        mutable = edit(s2, 0, b"\x6b\x8f\x12\x34")  # traffic class, flow label
        mutable = edit(mutable, 7, b"\x05")  # hop limit
        expect2 = bytearray(bytes(p2))
        expect2[0:4] = b"\x6b\x8f\x12\x34"
        expect2[7] = 5
        expect2 = bytes(expect2)
    pkts = [
        s1,  # ok
        immutable,  # icv-failure (IPv6: the source belongs to no SA: unknown-spi)
        flip(s2, len(s2) - 3),  # payload byte: icv-failure
        edit(s2, ah_off, b"\x11" if s2[ah_off] != 17 else b"\x06"),  # AH next header: icv-failure
        mutable,  # routers' changes: ok
        s3,  # ok
    ]
    run = run_tunsec(cfg, "in", pkts, work)
    if v4:
        expect_summary(run, read=6, written=3, icv_failure=3)
    else:
        expect_summary(run, read=6, written=3, unknown_spi=1, icv_failure=2)
    assert run.packets == [bytes(p1), expect2, bytes(p3)]


def test_ah_v6_immutable_header_field(work):
    """An immutable IPv6 header field that leaves the SA lookup alone: the
    payload length cannot be changed without breaking the packet, so change
    the next-header byte of a hop-by-hop header before AH."""
    a, b = FAMILIES["v6"]
    hp = host_pair(a, b, SUITES["ah-sha256"])
    cfg = hp.write(work / "a.conf")
    p = canonical(IPv6(src=b, dst=a) / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * 4)])
                  / UDP(sport=1, dport=2) / Raw(b"x" * 50))
    s = bytes(scapy_seal(p, hp.inb, seq=1))
    x = bytearray(s)
    x[42 + 2] ^= 0x01  # PadN content (immutable)
    run = run_tunsec(cfg, "in", [bytes(x), s], work)
    expect_summary(run, read=2, written=1, icv_failure=1)
    assert run.packets == [bytes(p)]


@pytest.mark.parametrize("fam", FAMILIES)
def test_policy_requires_esp_and_ah(work, fam):
    a, b = FAMILIES[fam]
    other = "192.0.2.99" if fam == "v4" else "2001:db8::99"
    bypass = (
        "spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P in priority 10 none"
        if fam == "v4"
        else "spdadd ::/0 ::/0 icmp6 -P in priority 10 none"
    )
    hp = host_pair(a, b, SUITES["esp-aes128cbc-sha1+ah-sha1"], extra_policies=[bypass])
    cfg = hp.write(work / "a.conf")
    esp, ah = hp.inb.get("esp"), hp.inb.get("ah")
    t1, t2, t3, t4 = (tcp_packet(b, a, n, 200) for n in (1, 2, 3, 4))
    u = udp_packet(b, a, 5, 20)
    ping = icmp_echo(b, a, 6)
    stranger = tcp_packet(other, a, 7, 30)
    esp_only = canonical(esp.scapy().encrypt(t2, seq_num=1))
    ah_only = canonical(ah.scapy().encrypt(t3, seq_num=1))
    good = scapy_seal(t4, hp.inb, seq=2)
    esp_over_ah = canonical(esp.scapy().encrypt(canonical(ah.scapy().encrypt(t1, seq_num=3)), seq_num=3))
    pkts = [t1, u, esp_only, ah_only, good, esp_over_ah, ping, stranger]
    run = run_tunsec(cfg, "in", pkts, work)
    expect_summary(run, read=8, written=3, policy_mismatch=3, plaintext_refused=2)
    assert run.packets == [bytes(t4), bytes(ping), bytes(stranger)]


def esp_null_by_hand(sa: SA, plain, seq: int, pad: bytes, padlen: int | None = None) -> bytes:
    """ESP with NULL encryption built byte by byte: SPI, sequence, payload,
    `pad`, pad length, next header, then HMAC-SHA-256-128 (Python hmac)."""
    b = bytes(plain)
    assert b[0] >> 4 == 4
    ihl = (b[0] & 0xF) * 4
    body = struct.pack("!II", sa.spi, seq) + b[ihl:] + pad + bytes([len(pad) if padlen is None else padlen, b[9]])
    icv = hmac.new(sa.auth_key, body, hashlib.sha256).digest()[:16]
    hdr = bytearray(b[:ihl])
    hdr[9] = 50
    out = bytes(hdr) + body + icv
    # scapy agrees that the ICV is valid
    sa.scapy().auth_algo.verify(parse_ip(set_ip_len(out))[ESP], sa.auth_key)
    return set_ip_len(out)


def test_bad_padding_with_valid_icv(work):
    a, b = FAMILIES["v4"]
    hp = host_pair(a, b, SUITES["esp-null-sha256"])
    cfg = hp.write(work / "a.conf")
    sa = hp.inb.get("esp")
    p = udp_packet(b, a, 1, 100)  # 108 bytes + 2: two bytes of padding to 4
    assert (len(bytes(p)) - 20 + 2) % 4 == 2
    pkts = [
        esp_null_by_hand(sa, p, 1, b"\x01\x02"),  # correct: ok
        esp_null_by_hand(sa, p, 2, b"\x01\x09"),  # wrong byte: bad-padding
        esp_null_by_hand(sa, p, 3, b"\x00\x00"),  # zeros: bad-padding
        esp_null_by_hand(sa, p, 4, b"\x01\x02", padlen=250),  # longer than the payload: bad-padding
        esp_null_by_hand(sa, p, 5, bytes(range(1, 7))),  # 6 bytes, correct, not minimal: ok
    ]
    run = run_tunsec(cfg, "in", pkts, work)
    expect_summary(run, read=5, written=2, bad_padding=3)
    assert run.packets == [bytes(p), bytes(p)]


def test_bad_padding_under_aes_cbc(work):
    """The same through scapy's AES-CBC and HMAC: the padding is wrong
    inside a correctly encrypted and authenticated packet."""
    a, b = FAMILIES["v4"]
    hp = host_pair(a, b, SUITES["esp-aes128cbc-sha1"])
    cfg = hp.write(work / "a.conf")
    esa = hp.inb.get("esp")
    sa = esa.scapy()
    p = tcp_packet(b, a, 1, 100)  # 120 bytes + 2 -> 6 bytes of padding to 16
    raw = bytes(p)

    def build(seq, padding):
        plain = _ESPPlain(spi=esa.spi, seq=seq, iv=b"\x42" * 16, data=raw[20:], padding=padding,
                          padlen=len(padding), nh=6)
        enc = sa.crypt_algo.encrypt(sa, plain, sa.crypt_key)
        sa.auth_algo.sign(enc, sa.auth_key)
        hdr = bytearray(raw[:20])
        hdr[9] = 50
        return set_ip_len(bytes(hdr) + bytes(enc))

    pkts = [build(1, bytes(range(1, 7))), build(2, b"\x01\x02\x03\x04\x05\x07"), build(3, bytes(range(1, 23)))]
    run = run_tunsec(cfg, "in", pkts, work)
    expect_summary(run, read=3, written=2, bad_padding=1)
    assert run.packets == [raw, raw]


@pytest.mark.parametrize("fam", FAMILIES)
def test_outbound_refusals(work, fam):
    """Outbound: fragments cannot be protected in transport mode, `discard`
    drops, `require` without an SA drops (and asks for an SA), `use`
    without an SA sends in the clear, a result over 64 KiB is too big."""
    v4 = fam == "v4"
    a, b = FAMILIES[fam]
    pfx = "192.0.2." if v4 else "2001:db8::"
    disc, nosa, use = pfx + "66", pfx + "77", pfx + "88"
    hp = host_pair(a, b, SUITES["esp-aes256cbc-sha256"], extra_policies=[
        f"spdadd {a} {disc} any -P out discard",
        f"spdadd {a} {nosa} any -P out ipsec esp/transport//require",
        f"spdadd {a} {use} any -P out ipsec esp/transport//use",
    ])
    cfg = hp.write(work / "a.conf")
    ok = tcp_packet(a, b, 1, 100)
    if v4:
        first_frag = canonical(IP(src=a, dst=b, id=9, flags="MF") / UDP(sport=1, dport=2) / Raw(b"f" * 64))
        later_frag = canonical(IP(src=a, dst=b, id=9, frag=9) / Raw(b"g" * 40))
        big = udp_packet(a, b, 2, 65535 - 28 - 30)  # 65505 bytes: ESP pushes it past 65535
    else:
        first_frag = canonical(IPv6(src=a, dst=b) / IPv6ExtHdrFragment(id=9, m=1, offset=0) / UDP(sport=1, dport=2)
                               / Raw(b"f" * 64))
        later_frag = canonical(IPv6(src=a, dst=b) / IPv6ExtHdrFragment(id=9, nh=17, m=0, offset=9) / Raw(b"g" * 40))
        big = udp_packet(a, b, 2, 65535 - 8 - 30)  # payload length 65505
    pkts = [
        ok,
        first_frag,  # fragment
        later_frag,  # fragment
        tcp_packet(a, disc, 3, 10),  # policy-discard
        tcp_packet(a, nosa, 4, 10),  # no-sa
        tcp_packet(a, use, 5, 10),  # clear
        big,  # too-big
        tcp_packet(a, b, 6, 1400),
    ]
    run = run_tunsec(cfg, "out", pkts, work)
    expect_summary(run, read=8, written=3, fragment=2, policy_discard=1, no_sa=1, too_big=1)
    assert "ACQUIRE" in run.stderr
    assert scapy_open(run.packets[0], hp.out, seq=1) == bytes(ok)
    assert run.packets[1] == bytes(pkts[5])
    # after the refusals, protection carries on
    last = run.packets[2]
    esp = hp.out.get("esp")
    assert bytes(parse_ip(bytes(esp.scapy().decrypt(parse_ip(last))))) == bytes(pkts[7])


def test_port_selectors(work):
    """setkey selectors with ports and an upper-layer protocol."""
    a, b = FAMILIES["v4"]
    hp = host_pair(a, b, SUITES["esp-aes128gcm16"])
    text = hp.config_text().replace(f"spdadd {a} {b} any -P out", f"spdadd {a}[any] {b}[22] tcp -P out")
    assert f"{b}[22] tcp" in text
    cfg = work / "a.conf"
    cfg.write_text(text)
    ssh = tcp_packet(a, b, 1, 100, dport=22)
    web = tcp_packet(a, b, 2, 100, dport=80)
    dns = udp_packet(a, b, 3, 30, dport=22)
    run = run_tunsec(cfg, "out", [ssh, web, dns], work)
    expect_summary(run, read=3, written=3)
    assert scapy_open(run.packets[0], hp.out, seq=1) == bytes(ssh)
    assert run.packets[1:] == [bytes(web), bytes(dns)]
