"""Scenario `linux` (the seed's Linux-to-Linux setup: IPComp deflate under
ESP aes-cbc + hmac-sha256 under AH hmac-sha256, ICMP bypassed, IPv4):
compressible text crosses intact, and the wire shows it compressed.
"""

from collections import Counter

import pytest

from e2elib import (
    A4, B4, IFACE_A, PROTO_AH, PROTO_ESP, PROTO_ICMP, PROTO_IPCOMP, PROTO_TCP, Capture, between, ip_packets,
    make_topology, mkconf, parse_sas, tcp_transfer_check, tcp_transfer_start, tshark_esp,
)

MB = 1_000_000


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "6")
    a_conf, b_conf = mkconf("linux", topo.workdir / "conf")
    topo.sas = parse_sas(a_conf)
    assert sorted(s.proto for s in topo.sas) == ["ah", "ah", "esp", "esp", "ipcomp", "ipcomp"]
    topo.da = topo.daemon(topo.a, a_conf).start()
    topo.db = topo.daemon(topo.b, b_conf).start()
    return topo


def test_compressible_text_crosses_ipcomp_esp_ah_intact(net, tmp_path):
    size = 24 * MB
    # The start of the transfers is enough: 2000 packets from each host (a
    # count shared by both let the faster flow's start fill it).
    pcaps = {src: tmp_path / f"linux-{src}.pcap" for src in (A4, B4)}
    caps = [Capture(net, net.a, IFACE_A, pcap, count=2000, expr=f"src host {src}") for src, pcap in pcaps.items()]
    ca0, cb0 = net.da.counters(settle=0), net.db.counters(settle=0)
    ab = tcp_transfer_start(net, net.a, net.b, B4, 5701, size, text=True)
    ba = tcp_transfer_start(net, net.b, net.a, A4, 5702, size, text=True)
    tcp_transfer_check(*ab, size)
    tcp_transfer_check(*ba, size)
    for cap in caps:
        cap.stop()
    ca1, cb1 = net.da.counters(), net.db.counters()
    for d0, d1, who in ((ca0, ca1, "A"), (cb0, cb1, "B")):
        assert d1["out_bytes"] - d0["out_bytes"] >= size, f"{who}: {d0.line} -> {d1.line}"
        assert d1["in_bytes"] - d0["in_bytes"] >= size, f"{who}: {d0.line} -> {d1.line}"
        assert d1["dropped"] == d0["dropped"], f"{who} dropped packets: {d0.line} -> {d1.line}"

    # The wire: AH then ESP (or plain ICMP), nothing else.
    flows = [p for pcap in pcaps.values() for p in between(ip_packets(pcap), A4, B4)]
    kinds = Counter("ah+esp" if p.proto == PROTO_AH and p.payload[0] == PROTO_ESP else
                    "icmp" if p.proto == PROTO_ICMP else f"proto {p.proto}" for p in flows)
    assert set(kinds) <= {"ah+esp", "icmp"}, kinds
    assert kinds["ah+esp"] >= 2000, kinds
    # Inside ESP (tshark decrypts with the config's keys): IPComp for the
    # text segments, TCP for the short ones (acks: below the 90-byte threshold).
    rows = [r for pcap in pcaps.values() for r in tshark_esp(pcap, net.sas, [
        "frame.number", "ip.src", "esp.icv_good", "esp.icv_bad", "esp.protocol", "ip.len"])]
    assert len(rows) == kinds["ah+esp"], f"tshark saw {len(rows)} ESP packets of {kinds['ah+esp']}"
    inner = Counter()
    comp_len = []
    for r in rows:
        assert r["esp.icv_good"] in ("1", "True"), r
        assert r["esp.icv_bad"] in ("", "0", "False"), r
        proto = int(r["esp.protocol"], 0)
        assert proto in (PROTO_IPCOMP, PROTO_TCP), r
        inner[(r["ip.src"], proto)] += 1
        if proto == PROTO_IPCOMP:
            comp_len.append(int(r["ip.len"].split(";")[0]))
    for src in (A4, B4):
        assert inner[(src, PROTO_IPCOMP)] >= 500, f"too few compressed packets from {src}: {inner}"
    # A full segment is 1372 bytes before protection: compressed, far less.
    comp_len.sort()
    assert comp_len[len(comp_len) // 2] < 1000, f"median protected IPComp packet {comp_len[len(comp_len) // 2]} bytes"
