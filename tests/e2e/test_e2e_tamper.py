"""Tampered and replayed packets are dropped and counted.

A's daemon protects UDP datagrams to B while B's daemon is not running
yet, and the capture on A's veth keeps them: B has never seen their
sequence numbers. Then B's daemon starts and the captured frames are
written onto the veth again (AF_PACKET in A's namespace): first with one
byte flipped (ICV failure), then unchanged (accepted, delivered once), then
unchanged again (replay). B's counters must say exactly that.
"""

import signal
import time

import pytest

from e2elib import (
    A4, A6, B4, B6, IFACE_A, PROTO_AH, PROTO_ESP, Capture, find_sa, ip_packets, make_topology, mkconf,
    parse_sas, write_pcap,
)

K = 15  # datagrams per family
PORTS = {"v4": 7101, "v6": 7102}
ICV_LEN = {"windows": 12, "cbc": 16, "gcm": 16}  # hmac-sha1-96, hmac-sha256-128, GCM tag


@pytest.fixture(params=["cbc", "gcm", "windows"])
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "3")
    topo.scenario = request.param
    a_conf, b_conf = mkconf(request.param, topo.workdir / "conf")
    topo.sas = parse_sas(a_conf)
    topo.b_conf = b_conf
    topo.da = topo.daemon(topo.a, a_conf).start()
    return topo


def esp_offset(p) -> int:
    """Offset of the ESP header in the IP packet (after AH, if any)."""
    off = p.l4
    if p.proto == PROTO_AH:
        assert p.ip[off] == PROTO_ESP, "AH does not carry ESP"
        off += (p.ip[off + 1] + 2) * 4
    else:
        assert p.proto == PROTO_ESP, f"protocol {p.proto}"
    return off


def tamper(p, i: int, icv_len: int) -> bytes:
    """The frame with one byte flipped: in the ciphertext, the ICV, the IV,
    the ESP sequence number, or (under AH) AH's ICV and sequence number."""
    e = esp_offset(p)
    n = len(p.ip)
    choices = [e + 8 + 16 + (n - e - 8 - 16 - icv_len) // 2, n - 1, e + 8, e + 7]
    if p.proto == PROTO_AH:
        choices += [p.l4 + 12, p.l4 + 11]
    at = choices[i % len(choices)]
    fr = bytearray(p.frame)
    fr[p.off + at] ^= 0x80
    return bytes(fr)


def test_tampered_and_replayed_esp_are_dropped(net, tmp_path):
    pcap = tmp_path / "a-to-b.pcap"
    cap = Capture(net, net.a, IFACE_A, pcap)
    for fam, b in (("v4", B4), ("v6", B6)):
        net.tool(net.a, "udp-send", "--to", b, "--port", str(PORTS[fam]), "--count", str(K)).result(30)
    cap.stop()
    a2b = [p for p in ip_packets(pcap)
           if (p.src, p.dst) in ((A4, B4), (A6, B6)) and p.proto in (PROTO_ESP, PROTO_AH)]
    assert len(a2b) == 2 * K, f"captured {len(a2b)} protected packets A->B, expected {2 * K}"
    for p in a2b:
        spi = int.from_bytes(p.ip[esp_offset(p):esp_offset(p) + 4], "big")
        assert spi == find_sa(net.sas, p.src, p.dst, "esp").spi
    originals = write_pcap(tmp_path / "originals.pcap", [p.frame for p in a2b])
    tampered = write_pcap(tmp_path / "tampered.pcap",
                          [tamper(p, i, ICV_LEN[net.scenario]) for i, p in enumerate(a2b)])

    db = net.daemon(net.b, net.b_conf).start()
    rx = {fam: net.tool(net.b, "udp-recv", "--bind", b, "--port", str(PORTS[fam]), "--count", str(K + 1))
          for fam, b in (("v4", B4), ("v6", B6))}
    for r in rx.values():
        r.wait_ready()

    def inject(path):
        assert net.tool(net.a, "inject", "--iface", IFACE_A, str(path)).result(30)["sent"] == 2 * K

    inject(tampered)
    c = db.counters()
    assert (c["icv-failure"], c["dropped"], c["in_packets"]) == (2 * K, 2 * K, 0), c.line
    inject(originals)
    c = db.counters()
    assert (c["in_packets"], c["dropped"]) == (2 * K, 2 * K), c.line
    inject(originals)
    c = db.counters()
    assert (c["icv-failure"], c["replay"], c["dropped"], c["in_packets"]) == (2 * K, 2 * K, 4 * K, 2 * K), c.line
    # One more datagram through A's daemon (the next sequence number): accepted.
    for fam, b in (("v4", B4), ("v6", B6)):
        net.tool(net.a, "udp-send", "--to", b, "--port", str(PORTS[fam]), "--first", str(K), "--count", "1").result(30)
    for fam, r in rx.items():
        got = r.result(30)
        assert got["bad"] == [], f"{fam}: corrupted datagrams delivered: {got['bad']}"
        assert got["duplicates"] == {}, f"{fam}: replayed datagrams delivered twice: {got['duplicates']}"
        assert got["received"] == list(range(K + 1)), f"{fam}: {got['received']}"
    time.sleep(0.3)
    final = db.stop(signal.SIGINT)
    assert final.reasons == {"icv-failure": 2 * K, "replay": 2 * K}, final.line
    assert final["in_packets"] == 2 * K + 2, final.line
