"""How the daemon receives IPsec: by a tap (one ETH_P_ALL packet socket
per worker, skipping outgoing frames) with the kernel's copy dropped at
ingress, before the IP layer; or, where a tap would see frames twice
(stacked links) or is asked not to be used, by one socket per family with
the kernel's copy dropped at prerouting. Both carry traffic both ways on
both families; the ingress chain is there only in tap mode, takes the
kernel's copies (its counter moves), and never outlives the daemon.
"""

import json
import re
import signal

import pytest

from e2elib import A4, A6, B4, B6, TUN, make_topology, mkconf, ping, tcp_transfer_check, tcp_transfer_start, tunsec_bin


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "rx")
    topo.a_conf, topo.b_conf = mkconf("windows", topo.workdir / "conf")
    return topo


def ingress_table(net, ns) -> str:
    r = net.run(ns, "nft", "list", "table", "netdev", f"tunsec_{TUN}", check=False)
    return r.stdout if r.returncode == 0 else ""


def both_ways(net, port):
    for a, b in ((A4, B4), (A6, B6)):
        tcp_transfer_check(*tcp_transfer_start(net, net.a, net.b, b, port, 300_000), 300_000)
        tcp_transfer_check(*tcp_transfer_start(net, net.b, net.a, a, port + 1, 300_000), 300_000)
        port += 2


def dropped_at_ingress(table: str) -> int:
    return sum(int(n) for n in re.findall(r"counter packets (\d+) bytes \d+ drop", table))


def test_tap_receives_and_ingress_drops_the_kernels_copy(net):
    da, db = net.daemon(net.a, net.a_conf).start(), net.daemon(net.b, net.b_conf).start()
    assert "receiving by tap; received IPsec dropped at ingress on tsa0" in da.log(), da.log()
    table = ingress_table(net, net.b)
    assert "hook ingress" in table and "tsb0" in table, table
    before = dropped_at_ingress(table)
    both_ways(net, 6100)
    assert "0% packet loss" in ping(net, net.a, B4)
    after = dropped_at_ingress(ingress_table(net, net.b))
    cb = db.counters()
    # Every ESP/AH packet B's tap took, the kernel's copy died at ingress
    # (the ICMP bypass is plaintext and passes).
    assert cb["in_packets"] > 0
    assert after - before >= cb["in_packets"], (before, after, cb.line)
    da.stop()
    db.stop()
    assert ingress_table(net, net.a) == "" and ingress_table(net, net.b) == ""


def test_family_mode_clears_a_dead_taps_ingress_chain(net):
    """A tap instance killed with -9 leaves its ingress chain; a restart
    told to use sockets per family must not let that chain starve them."""
    da = net.daemon(net.a, net.a_conf).start()
    da.p.send_signal(signal.SIGKILL)
    da.p.wait(10)
    assert "hook ingress" in ingress_table(net, net.a)
    da = net.daemon(net.a, net.a_conf, env={"TUNSEC_RX": "family"}).start()
    db = net.daemon(net.b, net.b_conf).start()
    assert "receiving with a socket per family (TUNSEC_RX=family)" in da.log(), da.log()
    assert ingress_table(net, net.a) == ""
    both_ways(net, 6300)
    da.stop()
    db.stop()


def test_a_stacked_link_means_a_socket_per_family(net):
    """A's link made a bridge port (its addresses on the bridge): a tap
    would see each frame on the port and again on the bridge."""
    a = net.a
    net.run(a, "ip", "link", "add", "br7", "type", "bridge")
    try:
        for cmd in (["ip", "addr", "flush", "dev", "tsa0"], ["ip", "link", "set", "tsa0", "master", "br7"],
                    ["ip", "addr", "add", f"{A4}/24", "dev", "br7"],
                    ["ip", "addr", "add", f"{A6}/64", "dev", "br7", "nodad"], ["ip", "link", "set", "br7", "up"]):
            net.run(a, *cmd)
        assert "0% packet loss" in ping(net, a, B4, count=1) and "0% packet loss" in ping(net, a, B6, count=1)
        da, db = net.daemon(a, net.a_conf).start(), net.daemon(net.b, net.b_conf).start()
        assert re.search(r"receiving with a socket per family \(link (tsa0 has a master|br7 is stacked)", da.log()), \
            da.log()
        assert ingress_table(net, a) == ""
        assert "receiving by tap" in db.log()
        both_ways(net, 6200)
        ca = da.counters()
        assert ca["in_packets"] > 0 and ca["replay"] == 0, ca.line
        da.stop()
        db.stop()
    finally:
        net.run(a, "ip", "link", "del", "br7", check=False)
        net.run(a, "ip", "addr", "replace", f"{A4}/24", "dev", "tsa0", check=False)
        net.run(a, "ip", "addr", "replace", f"{A6}/64", "dev", "tsa0", "nodad", check=False)


def test_receive_ring_and_recvmmsg_carry_the_same_traffic(net):
    """With TUNSEC_RXRING=1 each packet socket has a receive ring
    (PACKET_RX_RING, TPACKET_V2); by default it reads with recvmmsg. Both
    carry TCP both ways on both families, and a transfer at full speed
    loses nothing in the kernel (the stats' net_rx_dropped, from
    PACKET_STATISTICS). (IPv4 datagrams larger than a frame, which take
    the socket's queue beside the ring: test_e2e_fragments.py.)"""
    da = net.daemon(net.a, net.a_conf, env={"TUNSEC_RXRING": "1"}).start()
    db = net.daemon(net.b, net.b_conf).start()
    assert "receive rings: frames of 2048 bytes" in da.log(), da.log()
    assert "receive rings" not in db.log(), db.log()
    both_ways(net, 6500)
    tcp_transfer_check(*tcp_transfer_start(net, net.a, net.b, B4, 6505, 20_000_000), 20_000_000)
    for d in (da, db):
        r = net.run(d.ns, str(tunsec_bin()), "stats", "--json", "--control", str(d.control))
        io = json.loads(r.stdout)["io"]
        assert io["net_rx"] > 0 and io["net_rx_dropped"] == 0, io
    da.stop()
    db.stop()
