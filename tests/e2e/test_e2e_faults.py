"""Faults (issue 11), each with traffic running and its bytes checked:
the interface taken down and up, its address changed, the TUN device
deleted from outside, kernel send buffers full (a tiny tbf qdisc), and
the control socket abused (a monitor that never reads while thousands of
events fire, 32 clients at once, a 1 MiB request). tunsec must keep
going or exit with a clear message, never spin (its CPU time in the
faulted state is measured), and control-socket faults must not stall the
packet path: a UDP probe through tunsec every 10 ms both ways sees no gap
over 100 ms."""

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from e2elib import A4, A6, B4, B6, IFACE_A, PY, Capture, ip_packets, make_topology, mkconf, snapshot, snapshot_diff, \
    tcp_transfer_check, tcp_transfer_start

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    b, peer = s.recvfrom(2048)
    s.sendto(b, peer)
"""

# One datagram every 10 ms to the echo server; prints sent, received,
# the longest round trip and the longest time without a reply.
PROBE = """
import json, select, socket, struct, sys, time
dst, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, port))
s.setblocking(False)
print("READY", flush=True)
sent = received = errors = 0
max_rtt = max_gap = 0.0
t0 = last = nxt = time.monotonic()
end = t0 + secs
while True:
    now = time.monotonic()
    if now < end and now >= nxt:
        try:
            s.send(struct.pack("!Id", sent, now) + bytes(100))
            sent += 1
        except OSError:
            errors += 1
        nxt += 0.01
    if now >= end + 0.5:
        break
    r, _, _ = select.select([s], [], [], max(0.0, min(nxt, end + 0.5) - time.monotonic()))
    while r:
        try:
            b = s.recv(2048)
        except (BlockingIOError, ConnectionRefusedError):
            break
        t = time.monotonic()
        received += 1
        max_rtt = max(max_rtt, t - struct.unpack("!Id", b[:12])[1])
        if t < end:
            max_gap = max(max_gap, t - last)
        last = t
print(json.dumps({"sent": sent, "received": received, "errors": errors,
                  "max_rtt_ms": round(max_rtt * 1000, 1), "max_gap_ms": round(max_gap * 1000, 1)}))
"""

ECHO_PORT = 9300


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "flt")
    topo.before = snapshot(topo, topo.a)
    topo.conf = mkconf("gcm", topo.workdir / "conf")
    topo.da = topo.daemon(topo.a, topo.conf[0]).start()
    topo.db = topo.daemon(topo.b, topo.conf[1]).start()
    echo = topo.spawn(topo.b, [PY, "-c", ECHO, B4, str(ECHO_PORT)], "echo")
    echo.wait_ready()
    yield topo


def probe(net, secs: float):
    p = net.spawn(net.a, [PY, "-c", PROBE, B4, str(ECHO_PORT), str(secs)], "probe")
    p.wait_ready()
    return p


def cpu_secs(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def idle_while(net, secs: float, fault):
    """Run `fault`, wait `secs`; the CPU seconds each daemon used meanwhile."""
    before = {d: cpu_secs(d.pid) for d in (net.da, net.db)}
    fault()
    time.sleep(secs)
    return {d.ns: cpu_secs(d.pid) - before[d] for d in (net.da, net.db)}


def test_interface_down_and_up(net):
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 9401, nbytes=6_000_000, rate=2_000_000)
    time.sleep(1)
    used = idle_while(net, 2, lambda: net.run(net.a, "ip", "link", "set", IFACE_A, "down"))
    net.run(net.a, "ip", "link", "set", IFACE_A, "up")
    # Linux drops IPv6 addresses with the link (keep_addr_on_down=0), as
    # it drops routes through them; an administrator puts it back.
    if A6 not in net.run(net.a, "ip", "-6", "addr", "show", "dev", IFACE_A).stdout:
        net.run(net.a, "ip", "addr", "add", f"{A6}/64", "dev", IFACE_A, "nodad")
    assert all(v < 0.3 for v in used.values()), f"CPU seconds over 2 s with the link down: {used}"
    tcp_transfer_check(tx, rx, 6_000_000)
    assert net.da.alive() and net.db.alive()


def test_address_changed_and_back(net):
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 9402, nbytes=6_000_000, rate=2_000_000)
    time.sleep(1)

    def change():
        net.run(net.a, "ip", "addr", "del", f"{A4}/24", "dev", IFACE_A)
        net.run(net.a, "ip", "addr", "add", "10.77.0.3/24", "dev", IFACE_A)

    used = idle_while(net, 2, change)
    net.run(net.a, "ip", "addr", "del", "10.77.0.3/24", "dev", IFACE_A)
    net.run(net.a, "ip", "addr", "add", f"{A4}/24", "dev", IFACE_A)
    assert all(v < 0.3 for v in used.values()), f"CPU seconds over 2 s with the address changed: {used}"
    tcp_transfer_check(tx, rx, 6_000_000)
    assert net.da.alive() and net.db.alive()


def test_send_buffers_full(net):
    """A tbf qdisc of 4 Mbit/s with a long queue under a UDP flood: the
    queued packets fill the raw sockets' send buffers (EAGAIN); tunsec
    counts what it cannot send, does not spin or block, and a TCP transfer
    started in the middle completes once the qdisc goes. (A short queue
    only drops: test_raw_socket_send_errors_are_counted.)"""
    before = net.da.counters()
    net.run(net.a, "tc", "qdisc", "add", "dev", IFACE_A, "root", "tbf", "rate", "4mbit", "burst", "4kb",
            "limit", "4mb")
    flood = net.spawn(net.a, [PY, "-c", (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "end = time.monotonic() + 3; n = 0\n"
        "while time.monotonic() < end:\n"
        "    try: s.sendto(bytes(1200), ('%s', 9499)); n += 1\n"
        "    except OSError: pass\n"
        "print(n)\n") % B4], "udp-flood")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 9403, nbytes=2_000_000)
    t0 = cpu_secs(net.da.pid)
    flood.p.wait(timeout=30)
    used = cpu_secs(net.da.pid) - t0
    during = net.da.counters()
    net.run(net.a, "tc", "qdisc", "del", "dev", IFACE_A, "root")
    tcp_transfer_check(tx, rx, 2_000_000)
    sealed = during["tun_rx"] - before["tun_rx"]
    print("flood:", flood.lines, "before:", before.line, "during:", during.line,
          f"CPU {used:.2f} s, {used / max(sealed, 1) * 1e6:.1f} us a packet")
    # The flood itself costs CPU: every datagram is sealed, and how many
    # the flood sends in 3 s depends on the machine (530,000 to 750,000
    # here, 2.1 to 2.7 CPU seconds, 3.4 to 4.4 us each). A spin would burn
    # CPU without packets to show for it.
    assert used / max(sealed, 1) < 8e-6, \
        f"{used:.2f} CPU seconds in 3 s of flood for {sealed} packets"
    assert net.da.alive()


def restart_both(net, confdir: str, env_a: dict | None = None):
    """Both daemons again with fresh keys (B has seen A's sequence
    numbers: a restarted A alone would be refused as replays), A with
    `env_a` added to its environment."""
    net.da.stop()
    net.db.stop()
    net.da.config, net.db.config = mkconf("gcm", net.workdir / confdir)
    net.da.env = dict(env_a or {})
    net.db.start()
    net.da.start()


def qdisc_dropped(net, ns, iface) -> int:
    out = net.run(ns, "tc", "-s", "qdisc", "show", "dev", iface).stdout
    return sum(int(n) for n in re.findall(r"\(dropped (\d+),", out))


def raw_queues(net, ns) -> list[int]:
    """rx_queue (receive and error queue bytes) of each IPPROTO_RAW socket
    in the namespace: tunsec's sending sockets."""
    out = []
    for f in ("raw", "raw6"):
        for line in net.run(ns, "cat", f"/proc/net/{f}").stdout.splitlines()[1:]:
            fields = line.split()
            if fields[1].upper().endswith(":00FF"):
                out.append(int(fields[4].split(":")[1], 16))
    return out


UDP_BURST = """
import socket, sys, time
dst, port, size, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + secs; n = 0
while time.monotonic() < end:
    try: s.sendto(bytes(size), (dst, port)); n += 1
    except OSError: pass
    if n % 64 == 0: time.sleep(0.001)
print(n)
"""


def test_raw_socket_send_errors_are_counted(net):
    """Singles on the raw sockets (TUNSEC_TX=raw). A qdisc that drops
    (tbf with a queue of a few packets): the kernel hides such a drop from
    a raw socket unless IP_RECVERR is set (net/ipv4/raw.c), so without it
    tunsec counted the dropped packets as sent. Every drop must show as a
    failed send (`net tx errors`), as many as the qdisc says it dropped.
    Then packets larger than the interface's MTU (lowered under a running
    tunsec): each fails with EMSGSIZE, which with IP_RECVERR also queues
    an error on the socket; tunsec drains that queue (it holds nothing
    afterwards) and says what the kernel reported."""
    restart_both(net, "conf-raw", {"TUNSEC_TX": "raw"})
    try:
        before = net.da.counters()
        net.run(net.a, "tc", "qdisc", "add", "dev", IFACE_A, "root", "tbf", "rate", "2mbit", "burst", "4kb",
                "limit", "6kb")
        for dst in (B4, B6):
            flood = net.spawn(net.a, [PY, "-c", UDP_BURST, dst, "9498", "1000", "1"], "udp-burst")
            flood.p.wait(timeout=30)
        during = net.da.counters()
        dropped = qdisc_dropped(net, net.a, IFACE_A)
        net.run(net.a, "tc", "qdisc", "del", "dev", IFACE_A, "root")
        errors = during["net_tx_errors"] - before["net_tx_errors"]
        print(f"qdisc dropped {dropped}; tunsec: {errors} failed sends, "
              f"{during['net_tx'] - before['net_tx']} sent; {during.line}")
        assert dropped > 100, f"the qdisc dropped only {dropped} packets: no test"
        # The qdisc's drops of other packets (ARP) are a handful at most.
        assert dropped - 10 <= errors <= dropped, \
            f"the qdisc dropped {dropped} packets, tunsec counted {errors} failed sends"

        net.run(net.a, "ip", "link", "set", IFACE_A, "mtu", "1300")
        before = net.da.counters()
        burst = net.spawn(net.a, [PY, "-c", (
            "import socket\n"
            "for fam, dst in ((socket.AF_INET, '%s'), (socket.AF_INET6, '%s')):\n"
            "    s = socket.socket(fam, socket.SOCK_DGRAM)\n"
            "    for i in range(100): s.sendto(bytes(1300), (dst, 9497))\n") % (B4, B6)], "big-datagrams")
        burst.p.wait(timeout=30)
        after = net.da.counters()
        queued = raw_queues(net, net.a)
        net.run(net.a, "ip", "link", "set", IFACE_A, "mtu", "1500")
        errors = after["net_tx_errors"] - before["net_tx_errors"]
        assert errors == 200, f"200 datagrams over the MTU, {errors} failed sends: {after.line}"
        assert queued and not any(queued), f"error queue bytes left on the raw sockets: {queued}"
        log = net.da.log()
        for v in (4, 6):
            assert re.search(rf"raw IPv{v} socket: \d+ errors? reported by the kernel .*Message too long.*mtu 1300",
                             log), log[-3000:]
        assert net.da.alive()
    finally:
        net.run(net.a, "tc", "qdisc", "del", "dev", IFACE_A, "root", check=False)
        net.run(net.a, "ip", "link", "set", IFACE_A, "mtu", "1500")
        restart_both(net, "conf-raw2")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 9406, nbytes=1_000_000)
    tcp_transfer_check(tx, rx, 1_000_000)


def ctl_socket(path, sndbuf: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if sndbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    s.connect(str(path))
    return s


def phase(net, name, secs, action):
    """`action` while a probe runs: the probe's result."""
    p = probe(net, secs)
    time.sleep(0.3)
    action()
    res = p.result(60)
    res["phase"] = name
    print(name, res)
    return res


def test_control_socket_abuse_does_not_stall_packets(net):
    c = net.da.control
    rss0 = net.da.rss_kib()
    results = [phase(net, "baseline", 3, lambda: None)]
    socks = []

    def monitor_and_expiries():
        # A monitor that never reads, while 2,000 SAs expire soft, then hard.
        mon = ctl_socket(c)
        mon.send(b"monitor;")
        socks.append(mon)
        adds = "".join(f"add 10.77.0.1 10.78.{i >> 8}.{i & 255} esp {0x10000 + i:#x} -ls 1 -lh 2 "
                       f"-E aes-gcm-16 0x{'ab' * 20};\n" for i in range(2000))
        s = ctl_socket(c, sndbuf=4 << 20)
        s.send(adds.encode())
        r = json.loads(s.recv(1 << 24))
        assert r["ok"], r
        socks.append(s)

    results.append(phase(net, "monitor not reading, 4,000 expiry events", 4, monitor_and_expiries))
    assert net.da.log().count("EXPIRE hard") >= 2000, net.da.log().count("EXPIRE hard")

    def clients_at_once():
        clients = [ctl_socket(c) for _ in range(30)]  # with the monitor and s: 32
        for k in clients:
            k.send(b"stats;")
        for k in clients:
            assert json.loads(k.recv(1 << 24))["ok"]
        extra = ctl_socket(c)  # the 33rd
        extra.settimeout(5)
        try:
            refused = extra.recv(65536)
        except ConnectionResetError:
            refused = b""
        assert b"too many" in refused or refused == b"", refused
        socks.extend(clients + [extra])

    results.append(phase(net, "32 clients at once", 3, clients_at_once))

    def big_requests():
        # A request of 1 MiB (comments and one statement) and one over it.
        s = socks[1]
        big = ("#" + "x" * 1022 + "\n") * 1023 + "spdadd 10.77.0.1 10.79.0.1 any -P out none;\n"
        big = big + " " * ((1 << 20) - len(big))
        assert len(big) == 1 << 20
        s.send(big.encode())
        r = json.loads(s.recv(1 << 24))
        assert r["ok"], r
        s.send(big.encode() + b" ")
        r = json.loads(s.recv(1 << 24))
        assert not r["ok"] and "larger than" in r["error"], r

    results.append(phase(net, "1 MiB requests", 3, big_requests))
    for k in socks:
        k.close()
    (net.workdir / "control-abuse.json").write_text(json.dumps(results, indent=1))
    base = results[0]["max_gap_ms"]
    for res in results:
        assert res["received"] >= res["sent"] - 2 and res["sent"] > 200, res
        # 100 ms, or the noise of this (shared, busy) machine's baseline.
        assert res["max_gap_ms"] < max(100, 2 * base), f"the packet path stalled: {results}"
    rss1 = net.da.rss_kib()
    assert rss1 - rss0 < 64 << 10, f"RSS grew from {rss0} to {rss1} KiB"
    assert net.da.alive()


def test_tun_deleted_exits_clearly_and_fails_closed(net):
    t0 = cpu_secs(net.da.pid)
    net.run(net.a, "ip", "link", "del", "tsec0")
    try:
        rc = net.da.p.wait(timeout=5)
    except Exception:
        used = cpu_secs(net.da.pid) - t0
        raise AssertionError(f"tunsec still runs 5 s after its TUN device was deleted ({used:.2f} CPU s):\n"
                             f"{net.da.log()[-2000:]}")
    log = net.da.log()
    assert rc != 0, log
    assert "the TUN device is gone" in log and "stopped unexpectedly" in log, log[-2000:]
    # Fail closed: nothing leaves in the clear, the blackhole stays.
    cap = Capture(net, net.a, IFACE_A, net.workdir / "tun-deleted.pcap")
    r = net.run(net.a, PY, "-c", (
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nerr = 0\n"
        "for i in range(5):\n    try: s.sendto(b'clear?', ('%s', 9404))\n    except OSError: err += 1\n"
        "print(err)\n") % B4)
    time.sleep(0.3)
    cap.stop()
    clear = [q for q in ip_packets(net.workdir / "tun-deleted.pcap") if q.proto == 17 and q.src == A4]
    assert not clear and r.stdout.strip() == "5", (clear, r.stdout)
    # A new tunsec takes over. B has seen A's sequence numbers up to the
    # hundreds of thousands: both start with fresh SAs, as after a rekey.
    net.db.stop()
    net.da.config, net.db.config = mkconf("gcm", net.workdir / "conf2")
    net.db.start()
    net.da.start()
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 9405, nbytes=1_000_000)
    tcp_transfer_check(tx, rx, 1_000_000)


def test_clean_stop_after_the_faults(net):
    net.da.stop()
    net.db.stop()
    diff = snapshot_diff(net.before, snapshot(net, net.a))
    assert not diff, diff
