#!/usr/bin/env python3
"""What the number of peers costs the running daemon (issue 10), as root:

    scripts/bench-peers.py [N ...]        (default 100 1000 10000)

For each N: a namespace of its own (tsbenchP, or $TUNSEC_BENCH_NS; a veth
with 10.77.0.1), a
setkey file with N peers (ESP aes-gcm-16 SAs both ways, an out and an in
policy each, the ICMP bypass), then `tunsec run` on it. It prints the time
to start (until the daemon says it is up) and to stop (SIGINT until it has
restored everything), and the median and worst time of changes made one
request at a time over the control socket, as an IKE daemon makes them
(from sending a request to receiving its reply): 200 `get`s (the floor:
socket, wake-ups, parsing, reply), 200 SAs added, updated and deleted, 50 outbound policies (routes over rtnetlink) and 20 inbound
ones (elements of nftables sets), 20 inbound policies that are not host to
host added and deleted (a rule each), `tunsec stats` (median of three); the same changes over the XFRM netlink
socket (`--xfrm`, the messages charon sends), timed from message to ack,
and the first inbound policy of a new priority alone (a new map and its rule);
the same with a listener of the SA and policy groups connected (as `ip
xfrm monitor`); and the worst gap in a 1 ms stream of
packets through tunsec while a burst of 10,000 changes (5,000 SAs added,
then deleted) arrives. `tunsec bench --peers` measures the
engine's share of the same changes and the per-packet cost, without the
daemon. Everything is removed at exit.
"""

import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# TUNSEC_BENCH_NS names the namespace (runs beside each other need their own).
NS = os.environ.get("TUNSEC_BENCH_NS", "tsbenchP")
ROOT = Path(__file__).resolve().parents[1]
# TUNSEC_BIN: another build to measure (then nothing is built).
BIN = Path(os.environ.get("TUNSEC_BIN", ROOT / "target" / "release" / "tunsec"))
KEY = "0x" + "11" * 20


# XFRM netlink messages, as charon or `ip xfrm` would send them
# (linux/xfrm.h), for the daemon's --xfrm socket: each datagram is what a
# NETLINK_XFRM socket carries.
XFRM_NEWSA, XFRM_DELSA, XFRM_NEWPOLICY, XFRM_UPDSA = 16, 17, 19, 26
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
INF = (1 << 64) - 1


def nlmsg(ty: int, flags: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), ty, flags, seq, 0) + payload


def nla(ty: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, ty) + payload + bytes(-n % 4)


def xaddr(a: str) -> bytes:
    return ipaddress.ip_address(a).packed.ljust(16, b"\0")


def selector(src: str, dst: str) -> bytes:
    # daddr, saddr, dport, dport_mask, sport, sport_mask, family,
    # prefixlen_d, prefixlen_s, proto, ifindex, user: 56 bytes.
    return struct.pack("=16s16sHHHHHBBB3xiI", xaddr(dst), xaddr(src), 0, 0, 0, 0, socket.AF_INET, 32, 32, 0, 0, 0)


def xfrm_sa(ty: int, src: str, dst: str, spi: int, seq: int) -> bytes:
    # xfrm_usersa_info (224 bytes) and the AEAD (rfc4106, 160-bit key).
    info = (selector(src, dst) + xaddr(dst) + struct.pack(">I", spi) + struct.pack("=B3x", 50) + xaddr(src)
            + struct.pack("=8Q", *[INF] * 8) + bytes(32) + bytes(12)
            + struct.pack("=IIHBBB7x", 0, 0, socket.AF_INET, 0, 64, 0))
    aead = struct.pack("=64sII", b"rfc4106(gcm(aes))", 160, 128) + bytes.fromhex(KEY[2:])
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if ty == XFRM_NEWSA else 0)
    return nlmsg(ty, flags, seq, info + nla(18, aead))


def xfrm_delsa(dst: str, spi: int, seq: int) -> bytes:
    # xfrm_usersa_id: daddr, spi, family, proto (24 bytes).
    body = xaddr(dst) + struct.pack(">I", spi) + struct.pack("=HBx", socket.AF_INET, 50)
    return nlmsg(XFRM_DELSA, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def xfrm_policy(src: str, dst: str, out: bool, seq: int) -> bytes:
    # xfrm_userpolicy_info (168 bytes) and one ESP transport template
    # (xfrm_user_tmpl, 64 bytes: any SPI, any algorithms).
    info = (selector(src, dst) + struct.pack("=8Q", *[INF] * 8) + bytes(32)
            + struct.pack("=IIBBBB4x", 0, 0, 1 if out else 0, 0, 0, 0))
    tmpl = (bytes(16) + struct.pack("=IB3xH2x", 0, 50, socket.AF_INET) + bytes(16)
            + struct.pack("=IBBBxIII", 0, 0, 0, 0, INF >> 32, INF >> 32, INF >> 32))
    return nlmsg(XFRM_NEWPOLICY, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, info + nla(5, tmpl))


def xfrm_errno(reply: bytes) -> int | None:
    """The errno of an ack (0: success), None if the reply is not one."""
    if len(reply) < 20 or struct.unpack_from("=H", reply, 4)[0] != 2:
        return None
    return -struct.unpack_from("=i", reply, 16)[0]


# Run in the namespace: for SECONDS, send a UDP datagram to the first peer
# every millisecond and time the ESP packets leaving by the veth (seen on
# its far end); print the worst gap in the first second (quiet) and after.
PROBE = r"""
import json, select, socket, sys, time
dur = float(sys.argv[1])
tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
tap.bind(("tsbp2", 0))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic()
nxt, seen = t0, []
while time.monotonic() - t0 < dur:
    now = time.monotonic()
    if now >= nxt:
        u.sendto(b"probe", ("10.128.0.1", 9))
        nxt += 0.001
    r, _, _ = select.select([tap], [], [], max(0, nxt - time.monotonic()))
    if r:
        f = tap.recv(2048)
        if len(f) > 34 and f[12:14] == b"\x08\x00" and f[23] == 50:
            seen.append(time.monotonic() - t0)
gap = lambda v: max((b - a for a, b in zip(v, v[1:])), default=dur) * 1000
print(json.dumps({"quiet": gap([t for t in seen if t < 1.0]), "burst": gap([t for t in seen if t >= 1.0]),
                  "packets": len(seen)}))
"""

# A listener of the XFRM socket's SA and policy groups (XFRMGRP_SA |
# XFRMGRP_POLICY, told as the preload shim tells it), reading everything.
MONITOR = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.send(struct.pack("=IHHII", 24, 0x7453, 1, 0, 4242) + struct.pack("=II", 4242, 0x4 | 0x8))
print("listening", flush=True)
while s.recv(1 << 16):
    pass
"""


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def peer(i: int) -> str:
    i += 1
    return f"10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def config(n: int) -> str:
    lines = ["spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P out priority 10 none;",
             "spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P in priority 10 none;"]
    for i in range(n):
        p = peer(i)
        lines += [f"add 10.77.0.1 {p} esp {0x10000 + 2 * i:#x} -r 64 -E aes-gcm-16 {KEY};",
                  f"add {p} 10.77.0.1 esp {0x10001 + 2 * i:#x} -r 64 -E aes-gcm-16 {KEY};",
                  f"spdadd 10.77.0.1 {p} any -P out ipsec esp/transport//require;",
                  f"spdadd {p} 10.77.0.1 any -P in ipsec esp/transport//require;"]
    return "\n".join(lines) + "\n"


def measure(n: int, d: Path) -> str:
    (d / "c.conf").write_text(config(n))
    log = open(d / "log", "w")
    t0 = time.monotonic()
    p = subprocess.Popen(["ip", "netns", "exec", NS, str(BIN), "run", "-c", str(d / "c.conf"), "--tun", "tsbp0",
                          "--control", str(d / "c.sock"), "--xfrm", str(d / "x.sock"), "--workers", "1"],
                         stdout=log, stderr=subprocess.STDOUT,
                         env={**os.environ, "RUST_LOG": "warn,tunsec=info", "NO_COLOR": "1"})
    try:
        while " up: " not in (d / "log").read_text():
            if p.poll() is not None:
                raise SystemExit(f"tunsec exited at start:\n{(d / 'log').read_text()[-2000:]}")
            time.sleep(0.01)
        start = time.monotonic() - t0
        # After "up" the daemon may go on logging (each policy and SA, when
        # there are few): measure once the log is still.
        size = -1
        while size != (d / "log").stat().st_size:
            size = (d / "log").stat().st_size
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(d / "c.sock"))

        # Replies land in one buffer, as a client in C would read them: a
        # recv(16 MiB) made Python allocate (mmap) and free 16 MiB per
        # request, about 15 µs that counted as the daemon's.
        buf = bytearray(1 << 24)

        def recv(sock):
            return bytes(memoryview(buf)[:sock.recv_into(buf)])

        def timed(reqs):
            # From sending the request to receiving the reply (its JSON is
            # read afterwards: the client's own work).
            v = []
            for r in reqs:
                t = time.perf_counter()
                s.send(r.encode())
                raw = recv(s)
                v.append((time.perf_counter() - t) * 1e6)
                reply = json.loads(raw)
                if not reply["ok"]:
                    raise SystemExit(f"{r}: {reply}")
            v.sort()
            return f"{v[len(v) // 2]:.0f} µs (worst {v[-1]:.0f})"

        # The floor: a request that changes nothing (get the first peer's
        # SA): the socket, the wake-ups, parsing, the reply.
        floor = []
        for _ in range(200):
            t = time.perf_counter()
            s.send(f"get 10.77.0.1 {peer(0)} esp 0x10000;".encode())
            recv(s)
            floor.append((time.perf_counter() - t) * 1e6)
        floor.sort()
        fresh = [f"10.77.0.1 10.200.{i // 250}.{i % 250 + 1} esp {0x900000 + i:#x}" for i in range(200)]
        sa = timed([f"add {x} -E aes-gcm-16 {KEY};" for x in fresh])
        sa_upd = timed([f"update {x} -E aes-gcm-16 {KEY};" for x in fresh])
        sa_del = timed([f"delete {x};" for x in fresh])
        out = timed([f"spdadd 10.77.0.1 10.201.{i // 250}.{i % 250 + 1} any -P out ipsec esp/transport//require;"
                     for i in range(50)])
        inp = timed([f"spdadd 10.202.{i // 250}.{i % 250 + 1} 10.77.0.1 any -P in ipsec esp/transport//require;"
                     for i in range(20)])
        # `tunsec stats` as a user runs it (the client too; its figure of
        # refused plaintext is cached for a second: each call 1 s apart).
        st = []
        for _ in range(3):
            time.sleep(1.05)
            t = time.perf_counter()
            subprocess.run([str(BIN), "stats", "--json", "--control", str(d / "c.sock")], check=True,
                           stdout=subprocess.DEVNULL)
            st.append((time.perf_counter() - t) * 1e3)
        stats = f"{sorted(st)[1]:.0f} ms"
        # Inbound policies that are not host to host (a subnet, a protocol
        # and a port): a rule each in the input chain, added and deleted.
        rules = [f"10.209.{i}.0/24 10.77.0.1[{1000 + i}] tcp" for i in range(20)]
        rule_add = timed([f"spdadd {r} -P in discard;" for r in rules])
        rule_del = timed([f"spddelete {r} -P in;" for r in rules])
        # The same over the XFRM socket (what charon sends), from sending
        # the message to receiving its ack.
        x = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        x.connect(str(d / "x.sock"))

        def xtimed(msgs):
            v = []
            for m in msgs:
                t = time.perf_counter()
                x.send(m)
                raw = recv(x)
                v.append((time.perf_counter() - t) * 1e6)
                if xfrm_errno(raw) != 0:
                    raise SystemExit(f"xfrm: message type {m[4]} refused: errno {xfrm_errno(raw)}")
            v.sort()
            return f"{v[len(v) // 2]:.0f} µs (worst {v[-1]:.0f})"

        xpeers = [f"10.204.{i // 250}.{i % 250 + 1}" for i in range(200)]
        x_add = xtimed([xfrm_sa(XFRM_NEWSA, "10.77.0.1", p, 0xb00000 + i, i) for i, p in enumerate(xpeers)])
        x_upd = xtimed([xfrm_sa(XFRM_UPDSA, "10.77.0.1", p, 0xb00000 + i, i) for i, p in enumerate(xpeers)])
        x_del = xtimed([xfrm_delsa(p, 0xb00000 + i, i) for i, p in enumerate(xpeers)])
        x_out = xtimed([xfrm_policy("10.77.0.1", f"10.205.{i // 250}.{i % 250 + 1}", True, i) for i in range(50)])
        # The first inbound policy at priority 0 needs a map and its rule
        # (the file's policies have the default priority): timed alone.
        x_map = xtimed([xfrm_policy("10.206.9.1", "10.77.0.1", False, 99)]).split(" ")[0]
        x_in = xtimed([xfrm_policy(f"10.206.{i // 250}.{i % 250 + 1}", "10.77.0.1", False, i) for i in range(20)])
        # Again with a listener of the SA and policy groups (as `ip xfrm
        # monitor`), in a process of its own, which hears of every change.
        mon = subprocess.Popen([sys.executable, "-c", MONITOR, str(d / "x.sock")], stdout=subprocess.PIPE, text=True)
        mon.stdout.readline()
        xpeers = [f"10.207.{i // 250}.{i % 250 + 1}" for i in range(200)]
        m_add = xtimed([xfrm_sa(XFRM_NEWSA, "10.77.0.1", p, 0xc00000 + i, i) for i, p in enumerate(xpeers)])
        m_del = xtimed([xfrm_delsa(p, 0xc00000 + i, i) for i, p in enumerate(xpeers)])
        m_out = xtimed([xfrm_policy("10.77.0.1", f"10.208.{i // 250}.{i % 250 + 1}", True, i) for i in range(50)])
        mon.terminate()
        mon.wait()
        x.close()
        # Workers never wait for the control plane: a 1 ms stream of UDP to
        # the first peer, sealed by tunsec, watched on the far end of the
        # veth, while 10,000 changes arrive one request at a time.
        probe = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", PROBE, "3.0"],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        burst = [f"add 10.77.0.1 10.203.{i // 250}.{i % 250 + 1} esp {0xa00000 + i:#x} -E aes-gcm-16 {KEY};"
                 for i in range(5000)]
        burst += [f"delete 10.77.0.1 10.203.{i // 250}.{i % 250 + 1} esp {0xa00000 + i:#x};" for i in range(5000)]
        t_burst = time.perf_counter()
        for r in burst:
            s.send(r.encode())
            if not json.loads(recv(s))["ok"]:
                raise SystemExit(f"{r}: refused")
        t_burst = time.perf_counter() - t_burst
        gaps = json.loads(probe.communicate(timeout=30)[0])
        s.close()
        t0 = time.monotonic()
        p.send_signal(2)
        p.wait(timeout=60)
        stop = time.monotonic() - t0
        return (f"peers {n:>6}: start {start:.2f} s, stop {stop:.2f} s; get (the floor) {floor[100]:.0f} µs; "
                f"SA add {sa}, update {sa_upd}, delete {sa_del}; "
                f"outbound policy {out}; inbound policy {inp}; inbound rule add {rule_add}, "
                f"delete {rule_del}; tunsec stats {stats}; XFRM: SA add {x_add}, update {x_upd}, "
                f"delete {x_del}, outbound policy {x_out}, inbound policy {x_in} (the first of a priority, a new map: "
                f"{x_map} µs); XFRM with a listener: "
                f"SA add {m_add}, delete {m_del}, outbound policy {m_out}; 10,000 changes in {t_burst:.2f} s: "
                f"worst gap of a 1 ms stream {gaps['burst']:.1f} ms (before {gaps['quiet']:.1f} ms, "
                f"{gaps['packets']} packets)")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench-peers.py: needs root (a network namespace, routes, nftables)")
    sizes = [int(a) for a in sys.argv[1:]] or [100, 1000, 10000]
    if "TUNSEC_BIN" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    sh("ip", "netns", "del", NS, check=False)
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "link", "add", "tsbp1", "type", "veth", "peer", "name", "tsbp2")
        sh("ip", "-n", NS, "addr", "add", "10.77.0.1/24", "dev", "tsbp1")
        sh("ip", "-n", NS, "link", "set", "tsbp1", "up")
        sh("ip", "-n", NS, "link", "set", "tsbp2", "up")
        # The peers are behind 10.77.0.2, which is the veth's far end (a
        # static neighbour: nothing answers there, the probe just watches).
        mac = json.loads(sh("ip", "-n", NS, "-j", "link", "show", "tsbp2").stdout)[0]["address"]
        sh("ip", "-n", NS, "neigh", "add", "10.77.0.2", "lladdr", mac, "dev", "tsbp1", "nud", "permanent")
        sh("ip", "-n", NS, "route", "add", "10.128.0.0/9", "via", "10.77.0.2", "dev", "tsbp1")
        with tempfile.TemporaryDirectory() as d:
            for n in sizes:
                print(measure(n, Path(d)), flush=True)
    finally:
        sh("ip", "netns", "del", NS, check=False)


if __name__ == "__main__":
    main()
