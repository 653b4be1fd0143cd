"""Ten thousand peers (issue 10): host A's configuration names 10,000
peers (ESP aes-gcm-16 both ways, an out and an in policy each); the first
is B over IPv4, the last B over IPv6, the 9,998 between are private
addresses nobody answers. A starts and stops within the issue's bounds,
traffic to the first and the last peer goes through their SAs, and a stop
leaves the namespace exactly as it was."""

import json
import subprocess
import time

import pytest

from e2elib import A4, A6, B4, B6, make_topology, snapshot, snapshot_diff, tcp_transfer_check, \
    tcp_transfer_start, tunsec_bin

N = 10_000
KEY = "0x" + "5a" * 20


def fake(i: int) -> str:
    return f"10.{128 + (i >> 14)}.{(i >> 6) & 255}.{(i & 63) + 1}"


def sa_pair(me, peer, spi_out, spi_in):
    return [f"add {me} {peer} esp {spi_out:#x} -r 64 -E aes-gcm-16 {KEY};",
            f"add {peer} {me} esp {spi_in:#x} -r 64 -E aes-gcm-16 {KEY};",
            f"spdadd {me} {peer} any -P out ipsec esp/transport//require;",
            f"spdadd {peer} {me} any -P in ipsec esp/transport//require;"]


def bypass():
    return [f"spdadd {a} {a} {p} -P {d} priority 10 none;" for a, p in (("0.0.0.0/0", "icmp"), ("::/0", "icmp6"))
            for d in ("out", "in")]


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "N")
    a = bypass() + sa_pair(A4, B4, 0x1000, 0x1001)
    for i in range(1, N - 1):
        a += sa_pair(A4, fake(i), 0x10000 + 2 * i, 0x10001 + 2 * i)
    a += sa_pair(A6, B6, 0x2000, 0x2001)
    b = bypass() + sa_pair(B4, A4, 0x1001, 0x1000) + sa_pair(B6, A6, 0x2001, 0x2000)
    topo.a_conf = topo.workdir / "a.conf"
    topo.a_conf.write_text("\n".join(a) + "\n")
    b_conf = topo.workdir / "b.conf"
    b_conf.write_text("\n".join(b) + "\n")
    topo.before = snapshot(topo, topo.a)
    topo.db = topo.daemon(topo.b, b_conf).start()
    t0 = time.monotonic()
    topo.da = topo.daemon(topo.a, topo.a_conf).start(timeout=60)
    topo.start_secs = time.monotonic() - t0
    yield topo


def sa_bytes(daemon, spi):
    r = subprocess.run([str(tunsec_bin()), "stats", "--control", str(daemon.control), "--json"], capture_output=True,
                       text=True, timeout=60)
    return sum(sa["bytes"] for sa in json.loads(r.stdout)["sas"] if sa["spi"] == spi)


def test_ten_thousand_peers_start_in_time(net):
    print(f"start with {N} peers: {net.start_secs:.2f} s")
    # Issue 10 asks for 2 s on this machine; the bound here leaves room
    # for a loaded CI machine.
    assert net.start_secs < 6, f"{net.start_secs:.2f} s"
    routes = net.run(net.a, "ip", "route", "show", "table", "all").stdout
    assert routes.count(" dev tsec0 ") >= N - 1, "a route into the TUN device per peer"


@pytest.mark.parametrize("dst,spi,port", [(B4, 0x1000, 5701), (B6, 0x2000, 5702)])
def test_traffic_to_the_first_and_the_last_peer(net, dst, spi, port):
    before = sa_bytes(net.da, spi)
    tx, rx = tcp_transfer_start(net, net.a, net.b, dst, port, nbytes=2_000_000)
    tcp_transfer_check(tx, rx, 2_000_000)
    assert sa_bytes(net.da, spi) - before >= 2_000_000, "the transfer went through the peer's own SA"


def test_stop_restores_the_namespace(net):
    t0 = time.monotonic()
    net.da.stop(timeout=60)
    secs = time.monotonic() - t0
    print(f"stop with {N} peers: {secs:.2f} s")
    assert secs < 6, f"{secs:.2f} s"
    diff = snapshot_diff(net.before, snapshot(net, net.a))
    assert not diff, diff
