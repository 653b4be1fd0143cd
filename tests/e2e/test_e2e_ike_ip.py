"""iproute2's `ip xfrm` keys tunsec through `tunsec ike` (issue 8): SAs and
policies added by hand carry traffic, `ip xfrm state/policy list` and
`ip xfrm monitor` show tunsec's state and changes. And the XFRM socket
under bad input: truncated, oversized and unknown messages, a client that
never reads, a flood of requests; none of them crash tunsec, stall another
client or change the state."""

import socket
import struct
import time

import pytest

from e2elib import A4, B4, make_topology, tcp_transfer_check, tcp_transfer_start, tunsec_bin

K1 = "0x" + "11" * 20
K2 = "0x" + "22" * 20


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "X")
    topo.da = topo.daemon(topo.a, None, xfrm=True).start()
    topo.db = topo.daemon(topo.b, None, xfrm=True).start()
    yield topo


def ipx(net, ns, daemon, *args, check=True):
    return net.run(ns, str(tunsec_bin()), "ike", "--xfrm", str(daemon.xfrm), "--", "ip", "xfrm", *args,
                   check=check)


def key_both(net):
    for ns, d, me, peer in ((net.a, net.da, A4, B4), (net.b, net.db, B4, A4)):
        for src, dst, spi, k in ((A4, B4, "0x1001", K1), (B4, A4, "0x2002", K2)):
            ipx(net, ns, d, "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", spi, "reqid", "7",
                "mode", "transport", "replay-window", "64", "aead", "rfc4106(gcm(aes))", k, "128")
        for dr, s, t in (("out", me, peer), ("in", peer, me)):
            ipx(net, ns, d, "policy", "add", "src", f"{s}/32", "dst", f"{t}/32", "proto", "tcp", "dir", dr,
                "tmpl", "src", s, "dst", t, "proto", "esp", "reqid", "7", "mode", "transport")


def test_ip_xfrm_keys_traffic_and_lists_state(net):
    mon = net.spawn(net.a, [str(tunsec_bin()), "ike", "--xfrm", str(net.da.xfrm), "--", "ip", "xfrm", "monitor"],
                    "ip-xfrm-monitor", stdout_file=True)
    time.sleep(0.5)
    key_both(net)
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5201, nbytes=10_000_000)
    tcp_transfer_check(tx, rx, 10_000_000)
    st = ipx(net, net.a, net.da, "state", "list").stdout
    assert "spi 0x00001001 reqid 7 mode transport" in st and "rfc4106(gcm(aes))" in st, st
    out_sa = st.split("spi 0x00001001")[0].rsplit("src", 1)[1]
    assert out_sa.startswith(f" {A4} dst {B4}"), st
    pol = ipx(net, net.a, net.da, "policy", "list").stdout
    assert f"src {A4}/32 dst {B4}/32 proto tcp" in pol and "dir out" in pol, pol
    # The kernel's own state stays empty.
    assert net.run(net.a, "ip", "xfrm", "state").stdout.strip() == ""
    # tunsec's own front end sees the same SAs, with the traffic counted.
    d = net.run(net.a, str(tunsec_bin()), "setkey", "--control", str(net.da.control), "-D").stdout
    assert "spi=4097(0x00001001)" in d, d
    # Deleting through ip xfrm; the monitor saw the changes.
    ipx(net, net.a, net.da, "state", "delete", "src", A4, "dst", B4, "proto", "esp", "spi", "0x1001")
    r = ipx(net, net.a, net.da, "state", "delete", "src", A4, "dst", B4, "proto", "esp", "spi", "0x1001",
            check=False)
    assert r.returncode != 0 and "No such process" in r.stderr, r.stderr
    time.sleep(0.5)
    mon.kill()
    seen = mon.out_path.read_text()
    assert "spi 0x00001001" in seen and "Deleted src" in seen and "dir out" in seen, seen


def nl(ty, flags, seq, payload=b""):
    return struct.pack("=IHHII", 16 + len(payload), ty, flags, seq, 0) + payload


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(path))
    s.settimeout(5)
    return s


def errno_of(reply):
    ln, ty, _, seq, _ = struct.unpack("=IHHII", reply[:16])
    assert ty == 2, reply
    return -struct.unpack("=i", reply[16:20])[0], seq


def test_bad_input_is_refused_and_changes_nothing(net):
    before = ipx(net, net.b, net.db, "state", "list").stdout + ipx(net, net.b, net.db, "policy", "list").stdout
    # A client that connects and never reads, while it listens to every group.
    idle = connect(net.db.xfrm)
    idle.send(nl(0x7453, 1, 0, struct.pack("=II", 999, 0xffffffff)))
    s = connect(net.db.xfrm)
    cases = [
        (nl(0x10, 5, 1, b"\0" * 100), 22),          # NEWSA cut short: EINVAL
        (nl(0x13, 5, 2, b"\0" * 168 + b"\x03\x00\x05\x00"), 22),  # bad attribute length
        (nl(0x99, 5, 3), 22),                       # unknown type
        (nl(0x21, 5, 4, b"\0" * 64), 92),           # MIGRATE: ENOPROTOOPT
        (nl(0x11, 5, 5, b"\0" * 24), 3),            # DELSA of nothing: ESRCH
    ]
    for msg, want in cases:
        s.send(msg)
        e, seq = errno_of(s.recv(65536))
        assert (e, seq) == (want, struct.unpack("=I", msg[8:12])[0]), (e, seq, msg[:16].hex())
    # A length that lies: one error, then the connection still works.
    lie = bytearray(nl(0x10, 5, 6, b"\0" * 8))
    lie[0:4] = struct.pack("=I", 4000)
    s.send(bytes(lie))
    assert errno_of(s.recv(65536))[0] == 22
    # Oversized: the connection is closed, nothing else.
    big = connect(net.db.xfrm)
    big.send(nl(0x10, 5, 7, b"\0" * 70000))
    assert big.recv(65536) == b""
    # A flood of 10,000 requests is answered one by one, in order.
    t0 = time.monotonic()
    for i in range(10_000):
        s.send(nl(0x25, 1, 1000 + i, b"\0" * 4))  # GETSPDINFO
        r = s.recv(65536)
        assert struct.unpack("=I", r[8:12])[0] == 1000 + i
    rate = 10_000 / (time.monotonic() - t0)
    print(f"GETSPDINFO round trips: {rate:.0f}/s")
    # 2,000 changes while the idle listener's buffer fills: each is
    # multicast to it (NEWSA/DELSA) without blocking the writer, and the
    # daemon still answers at once.
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctl.connect(str(net.db.control))
    key = "0x" + "33" * 20
    t0 = time.monotonic()
    for i in range(1000):
        for req in (f"add {A4} 10.77.0.9 esp 0x5000 -E aes-gcm-16 {key};", f"delete {A4} 10.77.0.9 esp 0x5000;"):
            ctl.send(req.encode())
            assert b'"ok":true' in ctl.recv(1 << 20).replace(b" ", b""), req
    print(f"2000 SA changes with a stalled listener: {time.monotonic() - t0:.2f} s")
    ctl.close()
    t0 = time.monotonic()
    s.send(nl(0x25, 1, 99, b"\0" * 4))
    assert struct.unpack("=I", s.recv(65536)[8:12])[0] == 99
    assert time.monotonic() - t0 < 0.5
    assert "a listener is not reading" in net.db.log()
    # The other clients and the state are as they were.
    after = ipx(net, net.b, net.db, "state", "list").stdout + ipx(net, net.b, net.db, "policy", "list").stdout
    assert after == before
    assert net.db.alive()
    for c in (idle, s, big):
        c.close()
