"""Extended sequence numbers (`-f esn`): the high 32 bits are never sent
but enter the ICV (RFC 4303 2.2.1, RFC 4302 2.5.1) and the AEAD AAD
(RFC 4106 5). scapy's SecurityAssociation computes both with esn_en=True.
"""

import pytest
from scapy.layers.ipsec import IPSecIntegrityError

from helpers import (
    SUITES,
    ah_encrypt_manual,
    canonical,
    expect_summary,
    host_pair,
    parse_ip,
    run_tunsec,
    tcp_packet,
    traffic_mix,
)

A, B = "192.0.2.1", "192.0.2.2"
ESN_SUITES = ["esp-aes128cbc-sha1", "esp-aes256cbc-sha256", "esp-aes128gcm16", "esp-chacha20poly1305", "ah-sha256"]


def esn_pair(suite_name, a=A, b=B):
    hp = host_pair(a, b, SUITES[suite_name])
    text = hp.config_text()
    assert text.count("-r 64 ") == 2
    return hp, text.replace("-r 64 ", "-r 64 -f esn ")


def scapy_sa(sa, esn_hi):
    s = sa.scapy()
    s.esn_en, s.esn = True, esn_hi
    return s


@pytest.mark.parametrize("suite_name", ESN_SUITES)
def test_esn_out(work, suite_name):
    hp, text = esn_pair(suite_name)
    cfg = work / "a.conf"
    cfg.write_text(text)
    plain = traffic_mix(A, B, big=False)[:4]
    run = run_tunsec(cfg, "out", plain, work)
    expect_summary(run, read=4, written=4)
    sa = hp.out.sas[0]
    for got, orig in zip(run.packets, plain):
        assert bytes(parse_ip(bytes(scapy_sa(sa, 0).decrypt(parse_ip(got))))) == bytes(orig)
        # without the high half in the ICV, it does not verify
        with pytest.raises(IPSecIntegrityError):
            sa.scapy().decrypt(parse_ip(got))


@pytest.mark.parametrize("suite_name", ESN_SUITES)
def test_esn_in_across_the_32bit_boundary(work, suite_name):
    hp, text = esn_pair(suite_name)
    cfg = work / "a.conf"
    cfg.write_text(text)
    sa = hp.inb.sas[0]
    p = [tcp_packet(B, A, i, 50 + i) for i in range(7)]

    def seal(pkt, seq64):
        return canonical(scapy_sa(sa, seq64 >> 32).encrypt(pkt, seq_num=seq64 & 0xFFFFFFFF))

    pkts = [
        seal(p[0], 1),
        seal(p[1], 100),
        seal(p[2], 0xFFFFFFF0),
        seal(p[3], 0x1_00000005),  # low half 5 after 0xfffffff0: high half 1
        seal(p[4], 0xFFFFFFF5),  # still inside the window, high half 0
        seal(p[5], 0x1_00000005),  # replay
        seal(p[6], 0x0_00000006),  # low half 6 means high half 1: ICV fails
    ]
    run = run_tunsec(cfg, "in", pkts, work)
    expect_summary(run, read=7, written=5, icv_failure=1, replay=1)
    assert run.packets == [bytes(x) for x in p[:5]]


def test_esn_ah_over_esp(work):
    """The ESP+AH bundle with ESN: AH must include the high half too."""
    hp = host_pair(A, B, SUITES["esp-aes128cbc-sha1+ah-sha1"])
    text = hp.config_text().replace("-r 64 ", "-r 64 -f esn ")
    cfg = work / "a.conf"
    cfg.write_text(text)
    esp, ah = hp.inb.get("esp"), hp.inb.get("ah")
    p = [tcp_packet(B, A, i, 300) for i in range(3)]
    pkts = []
    for i, seq in enumerate([1, 0x8000_0000, 0x1_0000_0003]):
        inner = canonical(scapy_sa(esp, seq >> 32).encrypt(p[i], seq_num=seq & 0xFFFFFFFF))
        if i == 0:
            # an AH ICV without the high half: refused
            pkts.append(ah_encrypt_manual(inner, ah, seq & 0xFFFFFFFF))
        pkts.append(ah_encrypt_manual(inner, ah, seq & 0xFFFFFFFF, esn_hi=seq >> 32))
    run = run_tunsec(cfg, "in", pkts, work)
    expect_summary(run, read=4, written=3, icv_failure=1)
    assert run.packets == [bytes(x) for x in p]

    # and tunsec's own output verifies with the high half (zero) in both ICVs
    run = run_tunsec(cfg, "out", [tcp_packet(A, B, 9, 100)], work)
    got = parse_ip(run.packets[0])
    got = parse_ip(bytes(scapy_sa(hp.out.get("ah"), 0).decrypt(got)))
    assert bytes(parse_ip(bytes(scapy_sa(hp.out.get("esp"), 0).decrypt(got)))) == bytes(tcp_packet(A, B, 9, 100))
