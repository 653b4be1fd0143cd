"""Fail closed (issue 11): `kill -9` of a daemon takes its TUN device and
the routes into it, but protected traffic must not then leave in the
clear by the main table. The blackhole routes under the TUN routes stop
it until a new tunsec on the same TUN name takes over; a clean stop
removes them."""

import signal
import time

import pytest

from e2elib import A4, B4, IFACE_A, Capture, ip_packets, make_topology, mkconf, snapshot, snapshot_diff, \
    tcp_transfer_check, tcp_transfer_start

SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = errors = 0
for i in range(5):
    try:
        s.sendto(b"in the clear? %d" % i, ("{dst}", {port}))
        sent += 1
    except OSError as e:
        errors += 1
print(sent, errors)
"""


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "F")
    topo.before = snapshot(topo, topo.a)
    a_conf, b_conf = mkconf("gcm", topo.workdir / "conf")
    topo.da = topo.daemon(topo.a, a_conf).start()
    topo.db = topo.daemon(topo.b, b_conf).start()
    yield topo


def udp_out(net, port):
    r = net.run(net.a, "python3", "-c", SEND.format(dst=B4, port=port))
    return [int(x) for x in r.stdout.split()]


def test_sigkill_fails_closed_and_a_new_tunsec_takes_over(net):
    cap = Capture(net, net.a, IFACE_A, net.workdir / "killed.pcap")
    udp_out(net, 7001)  # protected: ESP on the wire
    time.sleep(0.3)
    net.da.p.send_signal(signal.SIGKILL)
    net.da.p.wait(timeout=10)
    sent, errors = udp_out(net, 7002)
    time.sleep(0.3)
    cap.stop()
    pkts = ip_packets(net.workdir / "killed.pcap")
    esp = [p for p in pkts if p.proto == 50 and p.src == A4]
    clear = [p for p in pkts if p.proto == 17 and p.src == A4 and p.payload[2:4] == (7002).to_bytes(2, "big")]
    assert esp, "the first datagrams went out as ESP"
    assert not clear, f"{len(clear)} datagrams left in the clear after kill -9"
    assert errors == 5, f"sendto should fail on the blackhole: sent {sent}, errors {errors}"
    # The TUN routes went with the process; the blackholes are left.
    routes = net.run(net.a, "ip", "route", "show", "table", "all").stdout
    assert f"blackhole {B4}" in routes, routes
    # A new tunsec on the same TUN name takes over the dead one's plumbing.
    net.da.start()
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 7003, nbytes=1_000_000)
    tcp_transfer_check(tx, rx, 1_000_000)


def test_a_clean_stop_removes_the_blackholes(net):
    net.da.stop()
    after = snapshot(net, net.a)
    assert "blackhole" not in after["routes"] and "blackhole" not in after["routes6"]
    diff = snapshot_diff(net.before, after)
    assert not diff, diff
