#!/usr/bin/env python3
"""Small traffic tools for the tunsec end-to-end suite, run inside a network
namespace with `ip netns exec NS python nettool.py COMMAND ...`.

Standard library only (fast start). Every command prints one JSON object on
its last stdout line; servers print `READY` first, once they listen.

  tcp-recv   accept one TCP connection, read to EOF, report bytes + sha256
  tcp-send   connect, send N bytes (random, or compressible text) or send for
             a duration, report bytes + sha256
  udp-recv   collect numbered datagrams, verify each against its index
  udp-send   send numbered datagrams (every third carries a marker)
  probe      listen on a TCP and a UDP port; report whatever arrives
  inject     send the frames of a pcap file (Ethernet) on an interface
  flood      send malformed ESP/AH/IPComp frames on an interface
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import time

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32


def out(obj) -> None:
    print(json.dumps(obj), flush=True)


def ready() -> None:
    print("READY", flush=True)


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# --------------------------------------------------------------------------
# TCP
# --------------------------------------------------------------------------


def tcp_recv(a) -> None:
    s = socket.socket(family(a.bind), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.bind, a.port))
    s.listen(1)
    s.settimeout(a.timeout)
    ready()
    c, peer = s.accept()
    c.settimeout(a.timeout)
    h = hashlib.sha256()
    n = 0
    t0 = time.monotonic()
    while True:
        b = c.recv(1 << 18)
        if not b:
            break
        h.update(b)
        n += len(b)
    secs = time.monotonic() - t0
    c.close()
    out({"bytes": n, "sha256": h.hexdigest(), "peer": peer[0], "seconds": round(secs, 3)})


TEXT_WORDS = (
    "tunsec protects this line with ipcomp deflate then esp aes-cbc hmac-sha256 and ah "
    "hmac-sha256 in transport mode between two network namespaces; the quick brown fox "
    "jumps over the lazy dog while setkey policies decide what is protected"
).split()


def text_chunk(i: int, size: int) -> bytes:
    """Compressible text: numbered lines of a small vocabulary."""
    rnd = random.Random(i)
    lines = []
    n = 0
    k = 0
    while n < size:
        line = f"{i:08d}.{k:04d} " + " ".join(rnd.choice(TEXT_WORDS) for _ in range(12)) + "\n"
        lines.append(line)
        n += len(line)
        k += 1
    return "".join(lines).encode()[:size]


def tcp_send(a) -> None:
    fam = family(a.to)
    deadline = time.monotonic() + a.connect_timeout
    while True:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        try:
            s.connect((a.to, a.port))
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    marker = a.marker.encode() if a.marker else b""
    h = hashlib.sha256()
    n = 0
    i = 0
    chunk = 1 << 16
    t0 = time.monotonic()
    while True:
        if a.duration is not None:
            if time.monotonic() - t0 >= a.duration:
                break
            size = chunk
        else:
            if n >= a.bytes:
                break
            size = min(chunk, a.bytes - n)
        if a.text:
            b = text_chunk(i, size)
        else:
            b = os.urandom(size)
        if marker and len(b) > len(marker):
            # the marker at a few places in every chunk (so in many segments)
            bb = bytearray(b)
            for off in range(0, len(bb) - len(marker), 997):
                bb[off:off + len(marker)] = marker
            b = bytes(bb)
        s.sendall(b)
        h.update(b)
        n += len(b)
        i += 1
        if a.rate:
            ahead = n / a.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    s.shutdown(socket.SHUT_WR)
    # the receiver closes after reading everything
    while s.recv(4096):
        pass
    s.close()
    out({"bytes": n, "sha256": h.hexdigest(), "seconds": round(time.monotonic() - t0, 3)})


# --------------------------------------------------------------------------
# UDP
# --------------------------------------------------------------------------

UDP_SIZES = [1, 17, 64, 100, 255, 512, 999, 1200, 1280]


def datagram(i: int, size: int, marker: bytes) -> bytes:
    """Datagram number i: a header naming it, then bytes derived from i;
    every third one carries the marker."""
    head = f"{i:06d}:{size:05d}:".encode()
    body_len = max(0, size - len(head))
    body = bytearray(hashlib.shake_256(b"e2e-udp-%d" % i).digest(body_len))
    if marker and i % 3 == 0 and body_len >= len(marker):
        body[:len(marker)] = marker
    return head + bytes(body)


def udp_recv(a) -> None:
    s = socket.socket(family(a.bind), socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    except OSError:
        pass
    s.bind((a.bind, a.port))
    marker = a.marker.encode() if a.marker else b""
    ready()
    got: dict[int, int] = {}
    bad = []
    end = time.monotonic() + a.timeout
    while len(got) < a.count and time.monotonic() < end:
        r, _, _ = select.select([s], [], [], 0.2)
        if not r:
            continue
        b, peer = s.recvfrom(65535)
        try:
            i = int(b[:6])
            size = int(b[7:12])
        except ValueError:
            bad.append(b[:40].hex())
            continue
        if b != datagram(i, size, marker):
            bad.append(b[:40].hex())
            continue
        got[i] = got.get(i, 0) + 1
    # a short grace period for duplicates
    s.settimeout(0.3)
    try:
        while True:
            b, _ = s.recvfrom(65535)
            try:
                i = int(b[:6])
                size = int(b[7:12])
                if b == datagram(i, size, marker):
                    got[i] = got.get(i, 0) + 1
                    continue
            except ValueError:
                pass
            bad.append(b[:40].hex())
    except socket.timeout:
        pass
    with_marker = sum(1 for i in got if marker and i % 3 == 0)
    out({"received": sorted(got), "duplicates": {str(k): v for k, v in got.items() if v > 1},
         "bad": bad, "with_marker": with_marker})


def udp_send(a) -> None:
    s = socket.socket(family(a.to), socket.SOCK_DGRAM)
    marker = a.marker.encode() if a.marker else b""
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else UDP_SIZES
    sent = 0
    for i in range(a.first, a.first + a.count):
        size = max(sizes[i % len(sizes)], 13)
        s.sendto(datagram(i, size, marker), (a.to, a.port))
        sent += 1
        if a.interval:
            time.sleep(a.interval)
        elif sent % 10 == 0:
            time.sleep(0.002)
    out({"sent": sent})


# --------------------------------------------------------------------------
# probe: what reaches the application?
# --------------------------------------------------------------------------


def probe(a) -> None:
    fam = family(a.bind)
    t = socket.socket(fam, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    t.bind((a.bind, a.tcp_port))
    t.listen(16)
    u = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind((a.bind, a.udp_port))
    ready()
    tcp, udp = [], []
    end = time.monotonic() + a.duration
    while time.monotonic() < end and not (a.max_events and len(tcp) + len(udp) >= a.max_events):
        r, _, _ = select.select([t, u], [], [], 0.1)
        if t in r:
            c, peer = t.accept()
            c.settimeout(2)
            data = b""
            try:
                while len(data) < 4096:
                    b = c.recv(4096)
                    if not b:
                        break
                    data += b
            except OSError:
                pass
            c.close()
            tcp.append({"peer": peer[0], "data": data.decode("latin-1")})
        if u in r:
            b, peer = u.recvfrom(65535)
            udp.append({"peer": peer[0], "data": b.decode("latin-1")})
    out({"tcp": tcp, "udp": udp})


def tcp_hello(a) -> None:
    """Connect, send a short message, close (a probe's positive control)."""
    s = socket.create_connection((a.to, a.port), timeout=a.timeout)
    s.sendall(a.data.encode())
    s.close()
    if a.udp_port:
        u = socket.socket(family(a.to), socket.SOCK_DGRAM)
        u.sendto(a.data.encode(), (a.to, a.udp_port))
    out({"ok": True})


# --------------------------------------------------------------------------
# raw frames
# --------------------------------------------------------------------------


def read_pcap(path: str):
    with open(path, "rb") as f:
        data = f.read()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        e = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        e = ">"
    else:
        raise SystemExit(f"{path}: not a classic pcap file")
    off = 24
    frames = []
    while off + 16 <= len(data):
        _s, _u, incl, _orig = struct.unpack(e + "IIII", data[off:off + 16])
        off += 16
        frames.append(data[off:off + incl])
        off += incl
    return frames


def packet_socket(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
    except OSError:
        pass
    return s


def inject(a) -> None:
    frames = read_pcap(a.pcap)
    s = packet_socket(a.iface)
    for fr in frames:
        s.send(fr)
        if a.interval:
            time.sleep(a.interval)
    out({"sent": len(frames)})


def csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF


def mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


def ipv4(src, dst, proto, payload, *, tot_len=None, ihl=5, frag=0, opts=b"", ident=None) -> bytes:
    opts = opts + b"\0" * ((ihl * 4 - 20) - len(opts))
    ln = tot_len if tot_len is not None else 20 + len(opts) + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ln & 0xFFFF, ident if ident is not None else 0x4242,
                    frag, 64, proto, 0, socket.inet_pton(socket.AF_INET, src),
                    socket.inet_pton(socket.AF_INET, dst)) + opts
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def ipv6(src, dst, nh, payload, *, plen=None) -> bytes:
    ln = plen if plen is not None else len(payload)
    return struct.pack("!IHBB16s16s", 0x60000000, ln & 0xFFFF, nh, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


class Garbage:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.pool = os.urandom(1 << 20)

    def bytes(self, n: int) -> bytes:
        off = self.r.randrange(0, len(self.pool) - n) if n < len(self.pool) else 0
        return self.pool[off:off + n]

    def len(self, hi: int = 1400) -> int:
        # favour the short end, where header parsing lives
        return self.r.choice([self.r.randrange(0, 48), self.r.randrange(0, hi)])


def flood(a) -> None:
    """Malformed IPsec frames from A's addresses to B's, as fast as --pps
    allows, for --duration seconds. Kinds whose IP header is complete (so
    they pass tunsec's packet filter) are counted as `counted`; frames the
    filter cannot see (too short) or the kernel holds (fragments) are not."""
    g = Garbage(a.seed)
    r = g.r
    eth4 = mac(a.dst_mac) + mac(a.src_mac) + b"\x08\x00"
    eth6 = mac(a.dst_mac) + mac(a.src_mac) + b"\x86\xdd"
    spis = [int(x, 0) for x in a.spis.split(",")] if a.spis else []

    def spi():
        return r.choice(spis) if spis and r.random() < 0.6 else r.getrandbits(32)

    def esp_body():
        n = g.len()
        if n >= 8 and r.random() < 0.7:
            return struct.pack("!II", spi(), r.getrandbits(32)) + g.bytes(n - 8)
        return g.bytes(n)

    def ah_body():
        n = g.len()
        if n >= 12 and r.random() < 0.7:
            # next header, payload length (often inconsistent), reserved, spi, seq
            nh = r.choice([50, 6, 17, 108, 51, r.getrandbits(8)])
            pl = r.choice([4, 1, 0, 255, r.getrandbits(8)])
            return struct.pack("!BBHII", nh, pl, 0, spi(), r.getrandbits(32)) + g.bytes(n - 12)
        return g.bytes(n)

    def comp_body():
        n = g.len()
        if n >= 4 and r.random() < 0.7:
            return struct.pack("!BBH", r.choice([6, 17, 50, 51, 108, r.getrandbits(8)]), 0,
                               r.choice([2, 3, r.getrandbits(16)])) + g.bytes(n - 4)
        return g.bytes(n)

    bodies = {50: esp_body, 51: ah_body, 108: comp_body}

    def make():
        kind = r.randrange(12)
        proto = r.choice([50, 51, 108])
        if kind <= 3:
            return "v4", True, eth4 + ipv4(a.a4, a.b4, proto, bodies[proto]())
        if kind == 4:  # total length larger than the frame (truncated packet)
            body = bodies[proto]()
            return "v4-short", True, eth4 + ipv4(a.a4, a.b4, proto, body, tot_len=20 + len(body) + r.randrange(1, 600))
        if kind == 5:  # total length smaller than the frame, or below the header
            body = bodies[proto]()
            return "v4-long", True, eth4 + ipv4(a.a4, a.b4, proto, body, tot_len=r.randrange(0, 20 + len(body) + 1))
        if kind == 6:  # options (garbage) or an IHL beyond the packet
            ihl = r.randrange(6, 16)
            return "v4-opts", True, eth4 + ipv4(a.a4, a.b4, proto, bodies[proto](), ihl=ihl,
                                               opts=g.bytes(ihl * 4 - 20))
        if kind <= 9:
            return "v6", True, eth6 + ipv6(a.a6, a.b6, proto, bodies[proto]())
        if kind == 10:  # extension headers before the IPsec header, or a lying payload length
            if r.random() < 0.5:
                nh = r.choice([0, 60, 43])
                hl = r.randrange(0, 3)
                ext = bytes([proto, hl]) + g.bytes(hl * 8 + 6)
                return "v6-ext", True, eth6 + ipv6(a.a6, a.b6, nh, ext + bodies[proto]())
            body = bodies[proto]()
            return "v6-plen", True, eth6 + ipv6(a.a6, a.b6, proto, body, plen=r.getrandbits(16))
        # frames the filter never sees, or fragments the kernel reassembles first
        if r.random() < 0.5:
            return "tiny", False, (eth4 if r.random() < 0.5 else eth6) + g.bytes(r.randrange(0, 10))
        if r.random() < 0.5:
            return "v4-frag", False, eth4 + ipv4(a.a4, a.b4, proto, bodies[proto](),
                                                frag=r.choice([0x2000, 0x2000 | r.randrange(1, 100), r.randrange(1, 100)]),
                                                ident=r.getrandbits(16))
        return "v4-frag", False, eth4 + ipv4(a.a4, a.b4, proto, bodies[proto](), frag=0x2000,
                                            ident=r.getrandbits(16))

    s = packet_socket(a.iface)
    counts: dict[str, int] = {}
    counted = 0
    sent = 0
    errors = 0
    t0 = time.monotonic()
    ready()
    while True:
        el = time.monotonic() - t0
        if el >= a.duration:
            break
        ahead = sent / a.pps - el
        if ahead > 0:
            time.sleep(ahead)
        for _ in range(32):
            kind, count, frame = make()
            try:
                s.send(frame)
            except OSError:
                errors += 1
                continue
            sent += 1
            counts[kind] = counts.get(kind, 0) + 1
            if count:
                counted += 1
    out({"sent": sent, "counted": counted, "kinds": counts, "errors": errors,
         "seconds": round(time.monotonic() - t0, 2)})


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("tcp-recv")
    c.add_argument("--bind", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--timeout", type=float, default=120)
    c.set_defaults(fn=tcp_recv)

    c = sub.add_parser("tcp-send")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--bytes", type=int, default=0)
    c.add_argument("--duration", type=float)
    c.add_argument("--rate", type=float, default=0, help="bytes per second (0: unlimited)")
    c.add_argument("--text", action="store_true")
    c.add_argument("--marker", default="")
    c.add_argument("--timeout", type=float, default=60)
    c.add_argument("--connect-timeout", type=float, default=10)
    c.set_defaults(fn=tcp_send)

    c = sub.add_parser("udp-recv")
    c.add_argument("--bind", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--timeout", type=float, default=20)
    c.add_argument("--marker", default="")
    c.set_defaults(fn=udp_recv)

    c = sub.add_parser("udp-send")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--first", type=int, default=0)
    c.add_argument("--sizes", default="")
    c.add_argument("--interval", type=float, default=0)
    c.add_argument("--marker", default="")
    c.set_defaults(fn=udp_send)

    c = sub.add_parser("probe")
    c.add_argument("--bind", required=True)
    c.add_argument("--tcp-port", type=int, required=True)
    c.add_argument("--udp-port", type=int, required=True)
    c.add_argument("--duration", type=float, required=True)
    c.add_argument("--max-events", type=int, default=0, help="stop after this many (0: run for --duration)")
    c.set_defaults(fn=probe)

    c = sub.add_parser("tcp-hello")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--udp-port", type=int, default=0)
    c.add_argument("--data", required=True)
    c.add_argument("--timeout", type=float, default=10)
    c.set_defaults(fn=tcp_hello)

    c = sub.add_parser("inject")
    c.add_argument("--iface", required=True)
    c.add_argument("--interval", type=float, default=0.002)
    c.add_argument("pcap")
    c.set_defaults(fn=inject)

    c = sub.add_parser("flood")
    c.add_argument("--iface", required=True)
    c.add_argument("--src-mac", required=True)
    c.add_argument("--dst-mac", required=True)
    c.add_argument("--a4", required=True)
    c.add_argument("--b4", required=True)
    c.add_argument("--a6", required=True)
    c.add_argument("--b6", required=True)
    c.add_argument("--spis", default="")
    c.add_argument("--duration", type=float, default=10)
    c.add_argument("--pps", type=float, default=20000)
    c.add_argument("--seed", type=int, default=1)
    c.set_defaults(fn=flood)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
