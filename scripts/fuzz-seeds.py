#!/usr/bin/env python3
"""Write the seed corpora of the cargo fuzz targets into fuzz/seeds/TARGET/,
from what the repository already has: the captures (tests/data), the XFRM
messages charon, pluto and `ip xfrm` sent (tests/fixtures/xfrm), the setkey
files (netns/), plus a few packets and requests made here for the fuzz
state's addresses (fuzz/src/lib.rs: scenario N is 10.0.N.1 -> 10.0.N.2 and
fd00::N:1 -> fd00::N:2). Regenerated on every run; no third-party modules.
"""

import hashlib
import ipaddress
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "seeds"
SCENARIOS = 9


def put(target: str, data: bytes) -> None:
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


def pcap_packets(path: Path) -> list[bytes]:
    """IP packets of a classic pcap (link types RAW 101 and Ethernet 1)."""
    d = path.read_bytes()
    e = "<" if d[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    link = struct.unpack(e + "I", d[20:24])[0]
    off, out = 24, []
    while off + 16 <= len(d):
        incl = struct.unpack(e + "I", d[off + 8:off + 12])[0]
        frame = d[off + 16:off + 16 + incl]
        off += 16 + incl
        out.append(frame[14:] if link == 1 else frame)
    return out


def csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_packet(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0x1234, 0, 64, proto, 0, s.packed, d.packed)
        return h[:10] + struct.pack("!H", csum(h)) + h[12:] + l4
    return struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64, s.packed, d.packed) + l4


def addrs(n: int, v6: bool) -> tuple[str, str]:
    return (f"fd00::{n}:1", f"fd00::{n}:2") if v6 else (f"10.0.{n}.1", f"10.0.{n}.2")


def pcapng(packets: list[bytes], linktype: int = 101, tsresol: int = 9) -> bytes:
    def block(t: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        n = 12 + len(body)
        return struct.pack("<II", t, n) + body + struct.pack("<I", n)
    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    opt = struct.pack("<HHB", 9, 1, tsresol) + b"\0" * 3 + struct.pack("<HH", 0, 0)
    idb = block(1, struct.pack("<HHI", linktype, 0, 262144) + opt)
    epbs = b"".join(block(6, struct.pack("<IIIII", 0, 0, i * 1000, len(p), len(p)) + p)
                    for i, p in enumerate(packets))
    return shb + idb + epbs


def main() -> None:
    captures = sorted((ROOT / "tests" / "data").glob("*.pcap"))
    packets = [p for c in captures for p in pcap_packets(c)]
    made = []
    for n in range(1, SCENARIOS + 1):
        for v6 in (False, True):
            a, b = addrs(n, v6)
            made.append(ip_packet(a, b, 17, struct.pack("!HHHH", 5000, 53, 8 + 32, 0) + bytes(range(32))))
            made.append(ip_packet(a, b, 6, struct.pack("!HHIIBBHHH", 40000, 22, 1, 0, 0x50, 0x18, 512, 0, 0)
                                  + b"tunsec" * 40))
    # inbound: raw mode (even first byte) and structured mode (odd)
    for p in packets + made:
        put("inbound", b"\x00" + p)
    for i in range(16):
        put("inbound", bytes([1 + 2 * i]) + hashlib.sha512(b"in%d" % i).digest() * 4)
    # outbound: plaintext for every scenario, and the captures' packets
    for p in made + packets:
        put("outbound", p)
    for i in range(8):
        put("reassembly", hashlib.sha512(b"re%d" % i).digest() * 2)
    # gro: runs of in-order TCP segments (two flows interleaved, checked or
    # trusted), the made packets, and the captures' packets
    for v6 in (False, True):
        for trusted in (0, 1):
            a, b = addrs(1, v6)
            recs = b""
            for k in range(6):
                for port in (40000, 40001):
                    l4 = bytearray(struct.pack("!HHIIBBHHH", port, 5201, 1 + 1000 * k, 7, 0x50,
                                               0x18 if k == 5 else 0x10, 512, 0, 0) + bytes([k]) * 1000)
                    tail = struct.pack("!I3xB", len(l4), 6) if v6 else struct.pack("!xBH", 6, len(l4))
                    pseudo = ipaddress.ip_address(a).packed + ipaddress.ip_address(b).packed + tail
                    l4[16:18] = struct.pack("!H", csum(pseudo + bytes(l4)))
                    seg = ip_packet(a, b, 6, bytes(l4))
                    recs += struct.pack("!HB", len(seg), trusted) + seg
            put("gro", bytes([1]) + recs)
    put("gro", bytes([1]) + b"".join(struct.pack("!HB", len(p), 0) + p for p in made + packets[:32]))
    # pcap: the captures and a pcapng of them, in both directions
    for c in captures:
        for d in (b"\x00", b"\x01"):
            put("pcap", d + c.read_bytes())
    for d in (b"\x00", b"\x01"):
        put("pcap", d + pcapng(packets[:8]))
        put("pcap", d + pcapng(made[:4], tsresol=6))
    # setkey and control: the setkey files, and requests
    confs = sorted((ROOT / "netns").glob("*.conf"))
    texts = [c.read_bytes() for c in confs]
    texts.append(b"add 10.0.1.1 10.0.1.2 esp 0x1001 -m transport -r 64 -u 7 -lh 60 -ls 30 -bh 1000 -bs 500 "
                 b"-ph 10 -ps 5 -f esn -E aes-gcm-16 0x000102030405060708090a0b0c0d0e0f10111213;\n"
                 b"add fd00::1 fd00::2 ah 0x1002 -A hmac-sha512 0x" + b"ab" * 64 + b";\n"
                 b"add 10.0.1.1 10.0.1.2 ipcomp 0x1003 -C deflate -R;\n"
                 b"spdadd 10.0.1.0/24[any] 10.0.1.2[22] tcp -P out priority high-3 ipsec "
                 b"ipcomp/transport//use esp/transport//unique:7 ah/transport//require;\n"
                 b"spdadd ::/0 ::/0 icmp6 135,0 -P in priority 10 none;\n"
                 b"getspi 10.0.1.1 10.0.1.2 esp 0x2000-0x2fff;\nget 10.0.1.1 10.0.1.2 esp 0x1001;\n"
                 b"delete 10.0.1.1 10.0.1.2 esp 0x1001;\ndeleteall 10.0.1.1 10.0.1.2 esp;\n"
                 b"spddelete 10.0.1.0/24[any] 10.0.1.2[22] tcp -P out;\ndump esp;\nspddump;\nflush ah;\nspdflush;\n")
    for t in texts:
        put("setkey", t)
        put("control", t)
    for r in (b"stats;", b"dump;", b"dump esp -k;", b"dump ipcomp", b"spddump;", b"monitor;", b"register",
              b"# comment\nstats", b"dump bogus;"):
        put("control", r)
    # xfrm: every recorded message, alone and in each client's order
    fixtures = sorted((ROOT / "tests" / "fixtures" / "xfrm").glob("*.hex"))
    msgs = {}
    for f in fixtures:
        b = bytes.fromhex("".join(f.read_text().split()))
        msgs.setdefault(f.name.split("-")[0], []).append(b)
        for d in (b"\x00", b"\x01"):
            put("xfrm", d + b)
    for client, ms in msgs.items():
        for i in range(0, len(ms), 8):
            put("xfrm", b"\x00" + b"".join(ms[i:i + 8]))
    print(f"fuzz seeds in {OUT.relative_to(ROOT)}: " + ", ".join(
        f"{d.name} {len(list(d.iterdir()))}" for d in sorted(OUT.iterdir())), file=sys.stderr)


if __name__ == "__main__":
    main()
