"""ESP in UDP (RFC 3948, setkey's `esp-udp`) against scapy and tshark.

out: tunsec seals and encapsulates; the UDP header must be RFC 3948's
(ports as configured, IPv4 checksum zero, IPv6 checksum valid), scapy's
SA with a NAT-T header decrypts the original, and tshark's UDPENCAP and
ESP dissectors check every ICV.
in:  scapy seals and encapsulates; tunsec gives back the original packet,
keeps IKE (non-ESP marker) and NAT keepalives as the UDP they are, refuses
bare ESP for an encapsulated SA and encapsulated ESP for a bare one, and
recomputes the inner checksum a NAT made wrong.
"""

import struct
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from helpers import (
    SA,
    canonical,
    expect_summary,
    run_tunsec,
    traffic_mix,
    udp_packet,
    write_config,
)

FAMILIES = {
    "v4": ("192.0.2.1", "192.0.2.2"),
    "v6": ("2001:db8::1", "2001:db8::2"),
}
SUITES = {
    "gcm": dict(enc="aes-gcm-16"),
    "cbc-sha256": dict(enc="aes-cbc", auth="hmac-sha256"),
}


def pair(a, b, suite, ports=(4500, 4500), encap=True):
    """SAs a->b and b->a (ports mirrored) and require policies both ways."""
    out = SA.esp(a, b, 0x1100, **SUITES[suite])
    back = SA.esp(b, a, 0x2100, **SUITES[suite])
    if encap:
        out.encap = ports
        back.encap = (ports[1], ports[0])
    pol = [f"spdadd {a} {b} any -P out ipsec esp/transport//require;",
           f"spdadd {b} {a} any -P in ipsec esp/transport//require;"]
    return out, back, pol


def udp_of(b: bytes):
    """(offset of the UDP header, its fields) of an encapsulated packet."""
    if b[0] >> 4 == 4:
        assert b[9] == 17, f"protocol {b[9]}"
        off = (b[0] & 0xF) * 4
    else:
        assert b[6] == 17, f"next header {b[6]}"
        off = 40
    return off, struct.unpack("!HHHH", b[off: off + 8])


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("suite", SUITES)
def test_tunsec_out_scapy_decrypts(work, suite, fam):
    a, b = FAMILIES[fam]
    out, back, pol = pair(a, b, suite, ports=(4500, 31000))
    cfg = write_config(work / "a.conf", [out, back], pol)
    plain = traffic_mix(a, b)
    run = run_tunsec(cfg, "out", plain, work)
    expect_summary(run, read=len(plain), written=len(plain))
    for i, (got, orig) in enumerate(zip(run.packets, plain)):
        off, (sport, dport, ulen, csum) = udp_of(got)
        assert (sport, dport) == (4500, 31000), f"packet {i}"
        assert ulen == len(got) - off, f"packet {i}: UDP length"
        spi, seq = struct.unpack("!II", got[off + 8: off + 16])
        assert (spi, seq) == (out.spi, i + 1), f"packet {i}"
        if fam == "v4":
            assert csum == 0, f"packet {i}: RFC 3948 2.1 wants a zero checksum"
        else:
            # scapy computes the checksum the way RFC 8200 8.1 says.
            p = IPv6(got)
            want = p[UDP].chksum
            del p[UDP].chksum
            assert IPv6(bytes(p))[UDP].chksum == want != 0, f"packet {i}: UDP checksum"
        dec = out.scapy().decrypt((IP if fam == "v4" else IPv6)(got))
        assert bytes(canonical(dec)) == bytes(orig), f"packet {i}"


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("suite", SUITES)
def test_scapy_seals_tunsec_in_recovers(work, suite, fam):
    a, b = FAMILIES[fam]
    out, back, pol = pair(a, b, suite)
    # Host b's view: a->b is inbound.
    cfg = write_config(work / "b.conf", [out, back],
                       [f"spdadd {a} {b} any -P in ipsec esp/transport//require;"])
    plain = traffic_mix(a, b)
    sealed = [out.scapy().encrypt(p, seq_num=i + 1) for i, p in enumerate(plain)]
    assert all(bytes(s)[9 if fam == "v4" else 6] == 17 for s in sealed)
    run = run_tunsec(cfg, "in", sealed, work)
    expect_summary(run, read=len(plain), written=len(plain))
    for i, (got, orig) in enumerate(zip(run.packets, plain)):
        assert got == bytes(orig), f"packet {i}"


@pytest.mark.parametrize("fam", FAMILIES)
def test_tshark_decodes_udp_encapsulated_esp_and_checks_icvs(work, tshark, fam):
    a, b = FAMILIES[fam]
    out, back, pol = pair(a, b, "cbc-sha256")
    cfg = write_config(work / "a.conf", [out, back], pol)
    plain = traffic_mix(a, b, big=False)
    run = run_tunsec(cfg, "out", plain, work)
    fields = ["udp.dstport", "esp.spi", "esp.sequence", "esp.icv_good", "esp.icv_bad"]
    cmd = ["tshark", "-n", "-r", str(run.out_path),
           "-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE",
           "-o", out.tshark_uat(),
           # Inner dissectors off (an exception there hides the ICV verdict);
           # UDP stays on: it carries the ESP.
           "--disable-protocol", "mdns", "--disable-protocol", "tcp", "--disable-protocol", "icmp",
           "--disable-protocol", "icmpv6", "-T", "fields", "-E", "separator=|", "-E", "occurrence=f"]
    for f in fields:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines()]
    assert len(rows) == len(plain)
    for i, r in enumerate(rows):
        assert r["udp.dstport"] == "4500", r
        assert r["esp.spi"] == f"0x{out.spi:08x}" and r["esp.sequence"] == str(i + 1), r
        assert r["esp.icv_good"] in ("1", "True") and r["esp.icv_bad"] in ("", "0", "False"), r


@pytest.mark.parametrize("fam", FAMILIES)
def test_ike_keepalives_and_mismatches(work, fam):
    a, b = FAMILIES[fam]
    L3 = IP if fam == "v4" else IPv6
    out, back, _ = pair(a, b, "gcm")
    bare, _, _ = pair(a, b, "gcm", encap=False)
    bare.spi = 0x1200
    # Inbound: bypass UDP to port 4500 (what IKE's own traffic needs when
    # a policy covers everything), require ESP for the rest.
    cfg = write_config(work / "b.conf", [out, back, bare], [
        f"spdadd {a}[any] {b}[4500] udp -P in prio 10 none;",
        f"spdadd {a} {b} any -P in ipsec esp/transport//require;",
    ])
    p = udp_packet(a, b, 1, 100)
    ike = canonical(L3(src=a, dst=b) / UDP(sport=4500, dport=4500) / (b"\0\0\0\0" + b"ike-header" * 3))
    keepalive = canonical(L3(src=a, dst=b) / UDP(sport=4500, dport=4500) / b"\xff")
    # ESP for the encapsulated SA, sent bare: seal with a bare twin.
    twin = SA.esp(a, b, out.spi, "aes-gcm-16")
    twin.enc_key = out.enc_key
    bare_for_encap = twin.scapy().encrypt(p, seq_num=1)
    # ESP in UDP for an SA without encapsulation.
    bare_twin = SA.esp(a, b, bare.spi, "aes-gcm-16")
    bare_twin.enc_key = bare.enc_key
    bare_twin.encap = (4500, 4500)
    encap_for_bare = bare_twin.scapy().encrypt(p, seq_num=1)
    # ESP in UDP to 4500 with an SPI nobody has.
    stranger = SA.esp(a, b, 0x7777, "aes-gcm-16")
    stranger.encap = (4500, 4500)
    unknown = stranger.scapy().encrypt(p, seq_num=1)
    good = out.scapy().encrypt(p, seq_num=2)
    run = run_tunsec(cfg, "in", [ike, keepalive, bare_for_encap, encap_for_bare, unknown, good], work)
    expect_summary(run, read=6, written=3, encap_mismatch=2, unknown_spi=1)
    assert run.packets == [bytes(ike), bytes(keepalive), bytes(p)]


@pytest.mark.parametrize("fam", FAMILIES)
def test_inner_checksum_broken_by_a_nat_is_recomputed(work, fam):
    """RFC 3948 3.1.2: the peer computed its TCP/UDP checksum with its own
    (private) address; after a NAT the received packet names the public one."""
    a, b = FAMILIES[fam]
    private = "10.0.0.9" if fam == "v4" else "fd00::9"
    out, back, _ = pair(a, b, "gcm")
    cfg = write_config(work / "b.conf", [out, back],
                       [f"spdadd {a} {b} any -P in ipsec esp/transport//require;"])
    p = udp_packet(private, b, 1, 300)
    # The NAT rewrote the outer source; ESP's payload still carries the
    # checksum made for `private`.
    inner = bytes(p)[20 if fam == "v4" else 40:]
    natted_inner = (IP if fam == "v4" else IPv6)(src=a, dst=b) / UDP(inner)
    # Re-seal the packet whose UDP checksum is the private one.
    wrong = canonical(natted_inner)
    w = bytearray(bytes(wrong))
    off = 20 if fam == "v4" else 40
    w[off + 6: off + 8] = inner[6:8]
    wrong = (IP if fam == "v4" else IPv6)(bytes(w))
    sealed = out.scapy().encrypt(wrong, seq_num=1)
    run = run_tunsec(cfg, "in", [sealed], work)
    expect_summary(run, read=1, written=1)
    got = run.packets[0]
    assert got[off + 6: off + 8] != inner[6:8], "the checksum was left as the NAT made it"
    fixed = (IP if fam == "v4" else IPv6)(got)
    want = fixed[UDP].chksum
    del fixed[UDP].chksum
    assert (IP if fam == "v4" else IPv6)(bytes(fixed))[UDP].chksum == want
