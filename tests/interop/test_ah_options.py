"""Case 3: AH over IPv4 options and IPv6 extension headers.

Mutable fields (RFC 4302 3.3.3.1 and appendix A) must be zeroed for the
ICV by both sides: what a router may change in flight (TTL/hop limit, TOS,
flow label, Record Route, Timestamp, IPv6 options with the 0x20 bit) must
not break verification; anything else must.

Also checks where tunsec puts AH/ESP in an IPv6 chain: after hop-by-hop,
and after destination options only when a routing header follows them.
"""

import socket

import pytest
from scapy.layers.inet import IP, UDP, IPOption
from scapy.layers.inet6 import (
    HBHOptUnknown,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    RouterAlert,
)
from scapy.layers.ipsec import IPSecIntegrityError
from scapy.packet import Raw

from helpers import (
    SA,
    SUITES,
    ah_header,
    ah_sign,
    canonical,
    expect_summary,
    fix_ipv4_checksum,
    header_chain,
    host_pair,
    parse_ip,
    run_tunsec,
    scapy_open,
    scapy_seal,
    scapy_verify_ah,
    text_payload,
    write_config,
)

A4, B4 = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"

RA4 = b"\x94\x04\x00\x00"  # Router Alert (immutable)
RR4 = b"\x07\x07\x04" + b"\x00" * 4  # Record Route, one empty slot (mutable)
TS4 = b"\x44\x0c\x05\x00" + b"\x00" * 8  # Timestamp, two empty slots (mutable)


def v4_with_options(src, dst, opts: bytes, i: int, size: int = 300):
    return canonical(
        IP(src=src, dst=dst, id=0x4000 + i, ttl=64, tos=0x28, options=[IPOption(opts)])
        / UDP(sport=7000 + i, dport=7)
        / Raw(text_payload(size, i))
    )


def v4_packets(src, dst):
    return [
        v4_with_options(src, dst, RA4 + RR4 + b"\x00", 0),  # RA, RR, EOL pad
        v4_with_options(src, dst, RA4 + TS4, 1),
        v4_with_options(src, dst, RR4 + b"\x01" + RA4, 2, 40),  # RR, NOP, RA
    ]


def router_mutates_v4(b: bytes) -> bytes:
    """What routers may do: TTL, TOS, DF, Record Route / Timestamp entries."""
    x = bytearray(b)
    ihl = (x[0] & 0xF) * 4
    x[8] -= 3  # TTL
    x[1] = 0xB8  # DSCP EF
    x[6] |= 0x40  # DF set by a middlebox
    i = 20
    while i < ihl:
        t = x[i]
        if t == 0:
            break
        if t == 1:
            i += 1
            continue
        ln = x[i + 1]
        if t == 7:  # Record Route: fill a slot
            p = x[i + 2]
            x[i + p - 1: i + p + 3] = bytes([198, 51, 100, 254])
            x[i + 2] = p + 4
        elif t == 0x44:  # Timestamp: fill a slot
            p = x[i + 2]
            x[i + p - 1: i + p + 3] = (123456).to_bytes(4, "big")
            x[i + 2] = p + 4
        i += ln
    return fix_ipv4_checksum(bytes(x))


V4_SUITES = ["ah-sha256", "ah-sha1", "esp-aes128cbc-sha1+ah-sha1"]


@pytest.mark.parametrize("suite_name", V4_SUITES)
def test_v4_options_tunsec_signs_scapy_verifies(work, suite_name):
    hp = host_pair(A4, B4, SUITES[suite_name])
    cfg_a, cfg_b = hp.write(work / "a.conf"), hp.mirror().write(work / "b.conf")
    plain = v4_packets(A4, B4)
    run = run_tunsec(cfg_a, "out", plain, work)
    expect_summary(run, read=3, written=3)
    sa = hp.out.get("ah")
    chain = ["IPv4", "AH", "ESP"] if hp.out.get("esp") else ["IPv4", "AH", "UDP"]
    for i, (got, orig) in enumerate(zip(run.packets, plain)):
        ihl = (got[0] & 0xF) * 4
        assert header_chain(got) == chain
        assert got[20:ihl] == bytes(orig)[20:ihl], "options changed"
        assert scapy_open(got, hp.out, seq=i + 1) == bytes(orig)
        # What routers may change does not break scapy's verification...
        scapy_verify_ah(router_mutates_v4(got), sa)
        # ...but the immutable Router Alert value and the IP ID do.
        ra = got.index(RA4)
        with pytest.raises(IPSecIntegrityError):
            scapy_verify_ah(fix_ipv4_checksum(got[: ra + 2] + b"\x00\x01" + got[ra + 4:]), sa)
        with pytest.raises(IPSecIntegrityError):
            scapy_verify_ah(fix_ipv4_checksum(got[:4] + b"\x77\x77" + got[6:]), sa)

    # The same packets, changed in flight, into tunsec on the peer; the
    # tampered copy first (after the genuine one it would be a replay).
    mutated = [router_mutates_v4(p) for p in run.packets]
    ra = run.packets[0].index(RA4)
    bad_ra = fix_ipv4_checksum(run.packets[0][: ra + 2] + b"\x00\x01" + run.packets[0][ra + 4:])
    run2 = run_tunsec(cfg_b, "in", [bad_ra] + mutated, work)
    expect_summary(run2, read=4, written=3, icv_failure=1)
    assert run2.packets == [router_mutates_v4(bytes(p)) for p in plain]


@pytest.mark.parametrize("suite_name", V4_SUITES)
def test_v4_options_scapy_signs_tunsec_verifies(work, suite_name):
    hp = host_pair(A4, B4, SUITES[suite_name])
    cfg_a = hp.write(work / "a.conf")
    plain = v4_packets(B4, A4)
    sealed = [bytes(scapy_seal(p, hp.inb, seq=i + 1)) for i, p in enumerate(plain)]
    for s, p in zip(sealed, plain):
        ihl = (s[0] & 0xF) * 4
        assert header_chain(s)[:2] == ["IPv4", "AH"]
        assert s[20:ihl] == bytes(p)[20:ihl]
    run = run_tunsec(cfg_a, "in", sealed, work)
    expect_summary(run, read=3, written=3)
    assert run.packets == [bytes(p) for p in plain]

    # Changed in flight after scapy signed them: accepted (a new tunsec
    # run starts with fresh replay windows).
    mutated = [router_mutates_v4(s) for s in sealed]
    run = run_tunsec(cfg_a, "in", mutated, work)
    expect_summary(run, read=3, written=3)
    assert run.packets == [router_mutates_v4(bytes(p)) for p in plain]


# ---------------------------------------------------------------------------
# IPv6
# ---------------------------------------------------------------------------

MUT_HBH = b"MUTH"  # data of option 0x3e (0x20 bit set) in hop-by-hop
MUT_DST = b"MUTD"  # the same in destination options before a routing header
IMM_DST = b"IMMD"  # option 0x1e (immutable) in destination options
IMM_FIN = b"IMMF"  # immutable, in the final destination options


def opt(t, data):
    return HBHOptUnknown(otype=t, optdata=data)


def v6_cases(src, dst):
    udp = UDP(sport=5000, dport=5001) / Raw(text_payload(150, 6))
    hbh = IPv6ExtHdrHopByHop(options=[RouterAlert(value=0), PadN(optdata=b"")])
    return {
        # hop-by-hop only: AH/ESP right after it
        "hbh": canonical(IPv6(src=src, dst=dst, fl=0x12345, tc=0x20) / hbh / udp),
        # hop-by-hop + final destination options: AH/ESP between them
        "hbh-dst": canonical(
            IPv6(src=src, dst=dst)
            / IPv6ExtHdrHopByHop(options=[RouterAlert(value=0), PadN(optdata=b"")])
            / IPv6ExtHdrDestOpt(options=[opt(0x1E, IMM_FIN), opt(0x3E, b"MUTF")])
            / udp
        ),
        # dest-opts before a routing header: AH/ESP after the routing header
        "hbh-dst-rt-dst": canonical(
            IPv6(src=src, dst=dst)
            / IPv6ExtHdrHopByHop(options=[RouterAlert(value=0), opt(0x3E, MUT_HBH), PadN(optdata=b"\0\0")])
            / IPv6ExtHdrDestOpt(options=[opt(0x1E, IMM_DST), opt(0x3E, MUT_DST)])
            / IPv6ExtHdrRouting(addresses=[])
            / IPv6ExtHdrDestOpt(options=[opt(0x1E, IMM_FIN)])
            / udp
        ),
    }


# Where AH goes (tunsec, as Linux; RFC 4302 3.1.1) and where ESP goes.
AH_CHAIN = {
    "hbh": ["IPv6", "HBH", "AH", "UDP"],
    "hbh-dst": ["IPv6", "HBH", "AH", "DST", "UDP"],
    "hbh-dst-rt-dst": ["IPv6", "HBH", "DST", "RT", "AH", "DST", "UDP"],
}
ESP_CHAIN = {
    "hbh": ["IPv6", "HBH", "ESP"],
    "hbh-dst": ["IPv6", "HBH", "ESP"],
    "hbh-dst-rt-dst": ["IPv6", "HBH", "DST", "RT", "ESP"],
}


def router_mutates_v6(b: bytes) -> bytes:
    x = bytearray(b)
    x[0] = (x[0] & 0xF0) | 0x0B  # traffic class
    x[1] = 0x8F  # traffic class / flow label
    x[2:4] = b"\x99\x99"  # flow label
    x[7] = 3  # hop limit
    for tag in (MUT_HBH, MUT_DST):
        i = bytes(x).find(tag)
        if i >= 0:
            x[i: i + 4] = b"\xde\xad\xbe\xef"
    return bytes(x)


@pytest.mark.parametrize("suite_name", ["ah-sha1", "ah-sha256", "ah-sha384", "esp-aes128cbc-sha1+ah-sha1"])
def test_v6_extension_headers_tunsec_out(work, suite_name):
    hp = host_pair(A6, B6, SUITES[suite_name])
    cfg_a = hp.write(work / "a.conf")
    cfg_b = hp.mirror().write(work / "b.conf")
    cases = v6_cases(A6, B6)
    plain = list(cases.values())
    run = run_tunsec(cfg_a, "out", plain, work)
    expect_summary(run, read=len(plain), written=len(plain))
    sa = hp.out.get("ah")
    bundle = "esp" in [p for p, *_ in SUITES[suite_name]]
    for i, (name, got) in enumerate(zip(cases, run.packets)):
        chain = header_chain(got)
        if bundle:
            want = ESP_CHAIN[name][:-1] + ["AH", "ESP"]
        else:
            want = AH_CHAIN[name]
        assert chain == want, f"{name}: {chain}"
        assert scapy_open(got, hp.out, seq=i + 1) == bytes(cases[name]), name
        scapy_verify_ah(router_mutates_v6(got), sa)
        for tag in (IMM_DST,) if name == "hbh-dst-rt-dst" else ():
            i_ = got.find(tag)
            with pytest.raises(IPSecIntegrityError):
                scapy_verify_ah(got[:i_] + b"XXXX" + got[i_ + 4:], sa)

    # Into tunsec on the peer: mutated in flight (accepted), immutable
    # option data changed (refused), Router Alert value changed (refused).
    mutated = [router_mutates_v6(p) for p in run.packets]
    last = run.packets[2]
    i_ = last.find(IMM_DST)
    bad_imm = last[:i_] + b"XXXX" + last[i_ + 4:]
    ra = run.packets[0].find(b"\x05\x02\x00\x00")
    bad_ra = run.packets[0][: ra + 2] + b"\x00\x02" + run.packets[0][ra + 4:]
    # (tampered copies first: a verified packet would make them replays)
    run2 = run_tunsec(cfg_b, "in", [bad_imm, bad_ra] + mutated, work)
    expect_summary(run2, read=len(plain) + 2, written=len(plain), icv_failure=2)
    # Routers' changes are visible in the result, nothing else changed.
    assert run2.packets == [router_mutates_v6(bytes(p)) for p in plain]


@pytest.mark.parametrize("suite_name", ["ah-sha1", "ah-sha256", "ah-sha512", "esp-aes256gcm16+ah-sha256"])
def test_v6_extension_headers_scapy_signs(work, suite_name):
    hp = host_pair(A6, B6, SUITES[suite_name])
    cfg_a = hp.write(work / "a.conf")
    cases = v6_cases(B6, A6)
    plain = list(cases.values())
    # scapy's own placement (after every destination options header unless
    # a routing header comes before it)
    sealed = [scapy_seal(p, hp.inb, seq=i + 1) for i, p in enumerate(plain)]
    n = len(sealed)
    extra = []
    if suite_name.startswith("ah"):
        sa = hp.inb.get("ah")
        # Linux's placement for "hbh-dst" (AH before the final destination
        # options), built by hand and signed with scapy's zeroing.
        p = cases["hbh-dst"]
        hbh = p[IPv6ExtHdrHopByHop]
        rest = bytes(hbh.payload)
        hdr = IPv6(bytes(p))
        hdr[IPv6ExtHdrHopByHop].remove_payload()
        hdr[IPv6ExtHdrHopByHop].nh = 51
        del hdr.plen
        linux = ah_sign(hdr / ah_header(sa, 60, n + 1, True) / Raw(rest), sa)
        assert header_chain(bytes(linux)) == AH_CHAIN["hbh-dst"]
        scapy_verify_ah(bytes(linux), sa)
        extra.append(bytes(linux))
        # and mutated in flight
        m = router_mutates_v6(bytes(scapy_seal(cases["hbh-dst-rt-dst"], hp.inb, seq=n + 2)))
        scapy_verify_ah(m, sa)
        extra.append(m)
    run = run_tunsec(cfg_a, "in", [bytes(s) for s in sealed] + extra, work)
    expect_summary(run, read=n + len(extra), written=n + len(extra))
    assert run.packets[:n] == [bytes(p) for p in plain]
    if extra:
        assert run.packets[n] == bytes(cases["hbh-dst"])
        assert run.packets[n + 1] == router_mutates_v6(bytes(cases["hbh-dst-rt-dst"]))


# ---------------------------------------------------------------------------
# Source routes: the destination is mutable but predictable (RFC 4302
# 3.3.3.1). The sender computes the ICV over the header as it will arrive;
# the receiver over the header as it arrived.
# ---------------------------------------------------------------------------

R4_1, R4_2 = "198.51.100.1", "198.51.100.2"  # the route's hops (never contacted)
R6_1, R6_2 = "2001:db8:1::1", "2001:db8:1::2"


def route_configs(work, src, selector, final):
    """tunsec's outbound policy and SA for `selector` (as Linux: the first
    hop for IPv4 source routes, the final destination for IPv6 routing
    headers); the receiver's SA is keyed on itself. One key for both."""
    out_sa = SA.ah(src, selector, 0x3001, "hmac-sha256", label="routed")
    in_sa = SA.ah(src, final, 0x3001, "hmac-sha256", label="routed")
    cfg_out = write_config(work / "route-out.conf", [out_sa],
                           [f"spdadd {src} {selector} any -P out ipsec ah/transport//require;"])
    cfg_in = write_config(work / "route-in.conf", [in_sa],
                          [f"spdadd {src} {final} any -P in ipsec ah/transport//require;"])
    return out_sa, cfg_out, cfg_in


def lsrr(hops: list[str]) -> bytes:
    return bytes([131, 3 + 4 * len(hops), 4]) + b"".join(socket.inet_aton(h) for h in hops) + b"\x00"


def lsrr_route(b: bytes) -> bytes:
    """Carry an IPv4 packet along its loose source route (RFC 791 3.1):
    at each hop the next address becomes the destination and the hop
    records its own address in its place."""
    x = bytearray(b)
    i = 20
    assert x[i] == 131
    ln = x[i + 1]
    while x[i + 2] <= ln:
        slot = i + x[i + 2] - 1
        nxt = bytes(x[slot: slot + 4])
        x[slot: slot + 4] = x[16:20]  # a hop's own address, near enough
        x[16:20] = nxt
        x[i + 2] += 4
        x[8] -= 1
    return fix_ipv4_checksum(bytes(x))


def test_v4_loose_source_route(work):
    out_sa, cfg_out, cfg_in = route_configs(work, A4, R4_1, B4)
    plain = canonical(IP(src=A4, dst=R4_1, id=0x5151, options=[IPOption(lsrr([R4_2, B4]))])
                      / UDP(sport=7100, dport=7) / Raw(text_payload(200, 9)))
    run = run_tunsec(cfg_out, "out", [plain], work)
    expect_summary(run, read=1, written=1)
    sent = run.packets[0]
    assert sent[16:20] == socket.inet_aton(R4_1), "sent to the first hop"
    routed = lsrr_route(sent)
    assert routed[16:20] == socket.inet_aton(B4)
    # scapy zeroes the option and takes the destination as it arrived.
    scapy_verify_ah(routed, out_sa)
    with pytest.raises(IPSecIntegrityError):
        scapy_verify_ah(sent, out_sa)  # not routed: the destination differs
    run2 = run_tunsec(cfg_in, "in", [sent, routed], work)
    expect_summary(run2, read=2, written=1, unknown_spi=1)
    assert run2.packets == [lsrr_route(bytes(plain))]
    # scapy signs a packet as it arrives at B; tunsec verifies it.
    arrived = canonical(parse_ip(lsrr_route(bytes(plain))))
    signed = bytes(canonical(out_sa.scapy().encrypt(arrived, seq_num=2)))
    run3 = run_tunsec(cfg_in, "in", [signed], work)
    expect_summary(run3, read=1, written=1)
    assert run3.packets == [bytes(arrived)]


def rh_route(b: bytes) -> bytes:
    """Carry an IPv6 packet along a type 0 or 2 routing header (RFC 2460
    4.4): each hop swaps the destination with the next address."""
    p = IPv6(b)
    rh = p[IPv6ExtHdrRouting]
    while rh.segleft:
        addrs = list(rh.addresses)
        k = len(addrs) - rh.segleft
        addrs[k], p.dst = p.dst, addrs[k]
        rh.addresses = addrs
        rh.segleft -= 1
        p.hlim -= 1
    return bytes(p)


@pytest.mark.parametrize("rtype,hops", [(0, [R6_2, B6]), (2, [B6])])
def test_v6_routing_header(work, rtype, hops):
    out_sa, cfg_out, cfg_in = route_configs(work, A6, B6, B6)
    plain = canonical(IPv6(src=A6, dst=R6_1) / IPv6ExtHdrRouting(type=rtype, addresses=hops)
                      / UDP(sport=7200, dport=7) / Raw(text_payload(200, 10)))
    run = run_tunsec(cfg_out, "out", [plain], work)
    expect_summary(run, read=1, written=1)
    sent = run.packets[0]
    assert header_chain(sent) == ["IPv6", "RT", "AH", "UDP"]
    # scapy, as the sender, rearranges the routing header for the ICV
    # (zero_mutable_fields(sending=True)): the same bytes.
    assert sent == bytes(canonical(out_sa.scapy().encrypt(plain, seq_num=1)))
    routed = rh_route(sent)
    scapy_verify_ah(routed, out_sa)
    with pytest.raises(IPSecIntegrityError):
        scapy_verify_ah(sent, out_sa)
    # tunsec verifies what scapy signed, not only what tunsec signed:
    # scapy as the sender (it rearranges the routing header for the ICV),
    # then the packet routed to B. (scapy cannot sign the packet in its
    # arrived form, no segments left: what its encrypt makes of that fails
    # scapy's own verification, so it is no reference.)
    scapy_sent = bytes(canonical(out_sa.scapy().encrypt(plain, seq_num=2)))
    assert header_chain(scapy_sent) == ["IPv6", "RT", "AH", "UDP"]
    scapy_routed = rh_route(scapy_sent)
    scapy_verify_ah(scapy_routed, out_sa)
    # and a copy with one payload bit changed, which tunsec must refuse
    # (first: after its genuine twin it would be a replay)
    bad = bytearray(scapy_routed)
    bad[-1] ^= 1
    run2 = run_tunsec(cfg_in, "in", [bytes(bad), routed, scapy_routed], work)
    expect_summary(run2, read=3, written=2, icv_failure=1)
    assert run2.packets == [rh_route(bytes(plain))] * 2
