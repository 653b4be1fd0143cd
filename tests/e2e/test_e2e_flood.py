"""Malformed ESP, AH and IPComp at B for ten seconds (random bytes, real and
random SPIs, inconsistent lengths, truncated headers, IPv4 options, IPv6
extension headers, fragments), written onto A's veth with A's addresses,
while TCP keeps flowing through tunsec both ways. B stays up, the
transfers arrive intact, and B's memory does not grow.
"""

import re

import pytest

from e2elib import (
    A4, A6, B4, B6, IFACE_A, IFACE_B, find_sa, make_topology, mkconf, parse_sas, ping, tcp_transfer_check,
    tcp_transfer_start,
)

FLOOD_SECONDS = 10
FLOOD_PPS = 20000
RSS_GROWTH_LIMIT_KIB = 4 * 1024


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "4")
    a_conf, b_conf = mkconf("windows", topo.workdir / "conf")
    topo.sas = parse_sas(a_conf)
    topo.da = topo.daemon(topo.a, a_conf).start()
    topo.db = topo.daemon(topo.b, b_conf).start()
    return topo


def test_malformed_flood_while_tcp_flows(net):
    db = net.db
    spis = [find_sa(net.sas, a, b, proto).spi for a, b in ((A4, B4), (A6, B6)) for proto in ("esp", "ah")]
    rate = 20e6  # bytes/s each way: steady traffic that leaves CPU for the flood
    ab = tcp_transfer_start(net, net.a, net.b, B4, 5301, duration=FLOOD_SECONDS + 6, rate=rate)
    ba = tcp_transfer_start(net, net.b, net.a, A6, 5302, duration=FLOOD_SECONDS + 6, rate=rate)
    c0 = db.counters(settle=1.5)
    rss0 = db.rss_kib()
    flood = net.tool(net.a, "flood", "--iface", IFACE_A, "--src-mac", net.mac(net.a, IFACE_A),
                     "--dst-mac", net.mac(net.b, IFACE_B), "--a4", A4, "--b4", B4, "--a6", A6, "--b6", B6,
                     "--spis", ",".join(hex(s) for s in spis), "--duration", str(FLOOD_SECONDS),
                     "--pps", str(FLOOD_PPS), "--seed", "4242")
    sent = flood.result(FLOOD_SECONDS + 60)
    assert db.alive(), f"tunsec in {net.b} died during the flood:\n{db.log()[-3000:]}"
    rss1 = db.rss_kib()
    c1 = db.counters()
    # (the rate is the harness's, on a possibly busy machine: ask for a real flood, not the full rate)
    assert sent["seconds"] >= FLOOD_SECONDS and sent["sent"] >= FLOOD_SECONDS * 2000, sent
    # The flood reached tunsec, and tunsec dropped it (and nothing else).
    # net_rx also counts the legitimate transfer's packets (more of them
    # than the flood's at 20 MB/s): every packet B receives is either
    # accepted (in_packets) or dropped, so the flood's share is what was
    # received and not accepted.
    received = c1["net_rx"] - c0["net_rx"]
    accepted = c1["in_packets"] - c0["in_packets"]
    flood_seen = received - accepted
    dropped = c1["dropped"] - c0["dropped"]
    assert accepted > 0, f"the transfers stopped during the flood: {c0.line} -> {c1.line}"
    assert flood_seen >= 0.9 * sent["counted"], \
        f"B saw {flood_seen} of {sent['counted']} malformed packets: {c0.line} -> {c1.line}"
    assert dropped >= 0.9 * sent["counted"], f"B dropped {dropped} of {sent['counted']}: {c0.line} -> {c1.line}"
    # What was dropped is the flood: no legitimate packet was.
    assert dropped == flood_seen, f"dropped {dropped}, flood {flood_seen}: {c0.line} -> {c1.line}"
    assert c1["tun_tx_errors"] == c0["tun_tx_errors"], c1.line
    assert rss1 - rss0 <= RSS_GROWTH_LIMIT_KIB, f"B's RSS grew from {rss0} KiB to {rss1} KiB during the flood"

    for tx, rx in (ab, ba):
        r = tcp_transfer_check(tx, rx, None, timeout=60)
        assert r["sent"]["bytes"] >= rate * FLOOD_SECONDS * 0.5, f"the transfer stalled: {r}"
    # Still serving afterwards, and no worker hiccup in the log.
    ping(net, net.a, B4, count=2)
    tx, rx = tcp_transfer_start(net, net.a, net.b, B6, 5303, 2_000_000)
    tcp_transfer_check(tx, rx, 2_000_000)
    log = db.log()
    assert not re.search(r"panicked|ERROR|stopped unexpectedly", log), log[-3000:]
    final = db.stop()
    assert final["dropped"] >= dropped, final.line
