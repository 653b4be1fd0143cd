"""Shared helpers for the tunsec interop suite.

tunsec is driven through its offline mode (`tunsec pcap`); the other side of
every exchange is an independent implementation: scapy's
SecurityAssociation for ESP and AH, Python's zlib for IPComp/DEFLATE,
tshark and tcpdump as dissectors. Nothing here reuses tunsec code.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.ipsec import (
    AH,
    AUTH_ALGOS,
    ESP,
    SecurityAssociation,
    split_for_transport,
    zero_mutable_fields,
)
from scapy.packet import NoPayload, Packet, Raw
from scapy.utils import PcapWriter, RawPcapReader

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
# The seed's setkey files, verbatim, shared with the demo and netns scripts.
SEED_DIR = REPO_ROOT / "netns"
# The seed document itself, where the checkout sits beside shared/.
SEED_DOC = REPO_ROOT.parent / "shared" / "seeds" / "000_e6951fb8bd94d1cb.txt"

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101

PROTO_HOPOPTS = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_DSTOPTS = 60
PROTO_IPCOMP = 108

PROTO_NAMES = {
    PROTO_HOPOPTS: "HBH",
    PROTO_ICMP: "ICMP",
    PROTO_TCP: "TCP",
    PROTO_UDP: "UDP",
    PROTO_ROUTING: "RT",
    PROTO_FRAGMENT: "FRAG",
    PROTO_ESP: "ESP",
    PROTO_AH: "AH",
    PROTO_ICMPV6: "ICMPv6",
    PROTO_DSTOPTS: "DST",
    PROTO_IPCOMP: "IPCOMP",
}

MARKER = b"TUNSEC-INTEROP-MARKER"


def tunsec_bin() -> Path:
    """The binary under test: $TUNSEC_BIN, default target/debug/tunsec
    (relative paths are taken from the repository root)."""
    p = Path(os.environ.get("TUNSEC_BIN", "target/debug/tunsec"))
    if not p.is_absolute():
        p = REPO_ROOT / p
    return p


# --------------------------------------------------------------------------
# Keys and algorithms
# --------------------------------------------------------------------------


def key_bytes(label: str, n: int) -> bytes:
    """Deterministic key material (reproducible failures)."""
    return hashlib.shake_256(label.encode()).digest(n) if n else b""


# setkey name -> scapy name
SCAPY_ENC = {
    "aes-cbc": "AES-CBC",
    "aes-gcm-16": "AES-GCM",
    "chacha20-poly1305": "CHACHA20-POLY1305",
    "null": "NULL",
}
# setkey name -> (scapy name, key bytes, ICV bytes)
AUTH = {
    "hmac-sha1": ("HMAC-SHA1-96", 20, 12),
    "hmac-sha256": ("SHA2-256-128", 32, 16),
    "hmac-sha384": ("SHA2-384-192", 48, 24),
    "hmac-sha512": ("SHA2-512-256", 64, 32),
}
# setkey name -> tshark esp_sa UAT name
TSHARK_ENC = {
    "aes-cbc": "AES-CBC [RFC3602]",
    "aes-gcm-16": "AES-GCM with 16 octet ICV [RFC4106]",
    "null": "NULL",
}
TSHARK_AUTH = {
    "hmac-sha1": "HMAC-SHA-1-96 [RFC2404]",
    "hmac-sha256": "HMAC-SHA-256-128 [RFC4868]",
    "hmac-sha384": "HMAC-SHA-384-192 [RFC4868]",
    "hmac-sha512": "HMAC-SHA-512-256 [RFC4868]",
    None: "NULL",
}


def enc_key_len(enc: str, bits: int) -> int:
    if enc == "null":
        return 0
    if enc == "aes-cbc":
        return bits // 8
    if enc == "aes-gcm-16":
        return bits // 8 + 4  # key + salt, as setkey and scapy take it
    if enc == "chacha20-poly1305":
        return 36
    raise ValueError(enc)


@dataclass
class SA:
    """One SA, both as a setkey `add` line and as a scapy SecurityAssociation."""

    src: str
    dst: str
    proto: str  # esp | ah | ipcomp
    spi: int
    enc: str | None = None
    enc_key: bytes = b""
    auth: str | None = None
    auth_key: bytes = b""
    replay: int | None = 64
    raw_cpi: bool = False  # ipcomp -R
    encap: tuple[int, int] | None = None  # esp-udp (RFC 3948): (sport, dport)

    @staticmethod
    def esp(src, dst, spi, enc, bits=128, auth=None, replay=64, label=None) -> "SA":
        label = label or f"{src}>{dst}/esp/{spi:#x}"
        return SA(
            src,
            dst,
            "esp",
            spi,
            enc=enc,
            enc_key=key_bytes(label + "/enc", enc_key_len(enc, bits)),
            auth=auth,
            auth_key=key_bytes(label + "/auth", AUTH[auth][1]) if auth else b"",
            replay=replay,
        )

    @staticmethod
    def ah(src, dst, spi, auth, replay=64, label=None) -> "SA":
        label = label or f"{src}>{dst}/ah/{spi:#x}"
        return SA(src, dst, "ah", spi, auth=auth, auth_key=key_bytes(label + "/auth", AUTH[auth][1]), replay=replay)

    @staticmethod
    def ipcomp(src, dst, spi, raw_cpi=False) -> "SA":
        return SA(src, dst, "ipcomp", spi, replay=None, raw_cpi=raw_cpi)

    @property
    def wire_cpi(self) -> int:
        assert self.proto == "ipcomp"
        return self.spi if self.raw_cpi else 2

    @property
    def icv_len(self) -> int:
        if self.enc in ("aes-gcm-16", "chacha20-poly1305"):
            return 16
        return AUTH[self.auth][2] if self.auth else 0

    def setkey(self) -> str:
        if self.encap:
            parts = ["add", f"{self.src}[{self.encap[0]}]", f"{self.dst}[{self.encap[1]}]", "esp-udp",
                     f"0x{self.spi:x}"]
        else:
            parts = ["add", self.src, self.dst, self.proto, f"0x{self.spi:x}"]
        if self.replay is not None:
            parts += ["-r", str(self.replay)]
        if self.proto == "ipcomp":
            parts += ["-C", "deflate"]
            if self.raw_cpi:
                parts.append("-R")
        else:
            if self.proto == "esp":
                parts += ["-E", self.enc]
                if self.enc_key:
                    parts.append("0x" + self.enc_key.hex())
            if self.auth:
                parts += ["-A", self.auth, "0x" + self.auth_key.hex()]
        return " ".join(parts) + ";"

    def scapy(self) -> SecurityAssociation:
        if self.proto == "esp":
            return SecurityAssociation(
                ESP,
                spi=self.spi,
                crypt_algo=SCAPY_ENC[self.enc],
                crypt_key=self.enc_key or None,
                auth_algo=AUTH[self.auth][0] if self.auth else None,
                auth_key=self.auth_key or None,
                nat_t_header=UDP(sport=self.encap[0], dport=self.encap[1]) if self.encap else None,
            )
        if self.proto == "ah":
            return SecurityAssociation(AH, spi=self.spi, auth_algo=AUTH[self.auth][0], auth_key=self.auth_key)
        raise ValueError("scapy has no IPComp SA")

    def tshark_uat(self) -> str:
        fam = "IPv6" if ":" in self.src else "IPv4"
        aead = self.enc in ("aes-gcm-16", "chacha20-poly1305")
        akey = "" if aead or not self.auth else "0x" + self.auth_key.hex()
        ekey = "0x" + self.enc_key.hex() if self.enc_key else ""
        vals = [fam, self.src, self.dst, f"0x{self.spi:08x}", TSHARK_ENC[self.enc], ekey,
                TSHARK_AUTH[None if aead else self.auth], akey]
        return "uat:esp_sa:" + ",".join(f'"{v}"' for v in vals)


def rule_string(protos: list[str]) -> str:
    """`ipcomp/transport//use esp/transport//require ...` (innermost first)."""
    return " ".join(f"{p}/transport//{'use' if p == 'ipcomp' else 'require'}" for p in protos)


def setkey_text(sas: list[SA], policies: list[str], header: str = "flush;\nspdflush;\n") -> str:
    return header + "".join(sa.setkey() + "\n" for sa in sas) + "".join(p.rstrip(";") + ";\n" for p in policies)


def write_config(path: Path, sas: list[SA], policies: list[str], header: str = "flush;\nspdflush;\n") -> Path:
    path.write_text(setkey_text(sas, policies, header))
    return path


@dataclass
class Bundle:
    """The SAs one direction applies, innermost first (ipcomp, esp, ah),
    with policy selector src/dst."""

    src: str
    dst: str
    sas: list[SA]

    @property
    def protos(self) -> list[str]:
        return [s.proto for s in self.sas]

    def policy(self, direction: str, upper: str = "any", priority: str = "") -> str:
        prio = f" priority {priority}" if priority else ""
        return f"spdadd {self.src} {self.dst} {upper} -P {direction}{prio} ipsec {rule_string(self.protos)}"

    def get(self, proto: str) -> SA | None:
        return next((s for s in self.sas if s.proto == proto), None)


# Algorithm suites: list of (proto, enc, bits, auth), innermost first.
SUITES = {
    "esp-aes128cbc-sha1": [("esp", "aes-cbc", 128, "hmac-sha1")],
    "esp-aes256cbc-sha256": [("esp", "aes-cbc", 256, "hmac-sha256")],
    "esp-aes192cbc-sha384": [("esp", "aes-cbc", 192, "hmac-sha384")],
    "esp-aes128cbc-sha512": [("esp", "aes-cbc", 128, "hmac-sha512")],
    "esp-aes128gcm16": [("esp", "aes-gcm-16", 128, None)],
    "esp-aes256gcm16": [("esp", "aes-gcm-16", 256, None)],
    "esp-chacha20poly1305": [("esp", "chacha20-poly1305", 256, None)],
    "esp-null-sha256": [("esp", "null", 0, "hmac-sha256")],
    "ah-sha1": [("ah", None, 0, "hmac-sha1")],
    "ah-sha256": [("ah", None, 0, "hmac-sha256")],
    "ah-sha384": [("ah", None, 0, "hmac-sha384")],
    "ah-sha512": [("ah", None, 0, "hmac-sha512")],
    "esp-aes128cbc-sha1+ah-sha1": [("esp", "aes-cbc", 128, "hmac-sha1"), ("ah", None, 0, "hmac-sha1")],
    "esp-aes256gcm16+ah-sha256": [("esp", "aes-gcm-16", 256, None), ("ah", None, 0, "hmac-sha256")],
}


def make_bundle(src: str, dst: str, suite: list, spi_base: int, replay: int = 64) -> Bundle:
    sas = []
    for i, (proto, enc, bits, auth) in enumerate(suite):
        spi = spi_base + i
        if proto == "esp":
            sas.append(SA.esp(src, dst, spi, enc, bits, auth, replay=replay))
        elif proto == "ah":
            sas.append(SA.ah(src, dst, spi, auth, replay=replay))
        else:
            sas.append(SA.ipcomp(src, dst, spi))
    return Bundle(src, dst, sas)


@dataclass
class HostPair:
    """Host A (the one tunsec runs as) and its peer B."""

    a: str
    b: str
    out: Bundle  # A -> B, tunsec `out`
    inb: Bundle  # B -> A, tunsec `in`
    extra_policies: list[str] = field(default_factory=list)

    def config_text(self) -> str:
        return setkey_text(
            self.out.sas + self.inb.sas,
            self.extra_policies + [self.out.policy("out"), self.inb.policy("in")],
        )

    def write(self, path: Path) -> Path:
        path.write_text(self.config_text())
        return path

    def mirror(self) -> "HostPair":
        """The same SAs and policies as the peer B sees them."""
        return HostPair(self.b, self.a, self.inb, self.out, list(self.extra_policies))


def host_pair(a: str, b: str, suite: list, replay: int = 64, extra_policies=None) -> HostPair:
    return HostPair(
        a,
        b,
        make_bundle(a, b, suite, 0x1000 + 0x10 * len(suite), replay),
        make_bundle(b, a, suite, 0x2000 + 0x10 * len(suite), replay),
        list(extra_policies or []),
    )


# --------------------------------------------------------------------------
# Running tunsec
# --------------------------------------------------------------------------

SUMMARY_RE = re.compile(r"^read (\d+), written (\d+), dropped (\d+)(?: \((.*)\))?$", re.M)
# After the summary when fragments of IPsec packets were merged into datagrams.
REASSEMBLED_RE = re.compile(r"^reassembled (\d+) datagrams from (\d+) fragments$", re.M)


@dataclass
class Summary:
    line: str
    read: int
    written: int
    dropped: int
    reasons: dict[str, int]
    reassembled: int = 0
    fragments: int = 0


@dataclass
class Run:
    packets: list[bytes]
    summary: Summary
    stderr: str
    out_path: Path
    in_path: Path


def write_pcap(path: Path, packets, linktype: int = LINKTYPE_RAW) -> Path:
    """Classic pcap via scapy's writer (bytes records, so scapy does not
    second-guess the link type)."""
    w = PcapWriter(str(path), linktype=linktype, sync=False, snaplen=262144)
    try:
        for p in packets:
            w.write(bytes(p))
    finally:
        w.close()
    return path


def read_pcap(path: Path, want_linktype: int | None = LINKTYPE_RAW) -> list[bytes]:
    r = RawPcapReader(str(path))
    try:
        if want_linktype is not None:
            assert r.linktype == want_linktype, f"{path}: link type {r.linktype}, expected {want_linktype}"
        return [bytes(data) for data, _meta in r]
    finally:
        r.close()


def parse_summary(stderr: str) -> Summary:
    m = SUMMARY_RE.search(stderr)
    assert m, f"no summary line in tunsec stderr:\n{stderr}"
    reasons = {}
    if m.group(4):
        for part in m.group(4).split(", "):
            name, n = part.rsplit(" ", 1)
            reasons[name] = int(n)
    r = REASSEMBLED_RE.search(stderr)
    reassembled, fragments = (int(r.group(1)), int(r.group(2))) if r else (0, 0)
    return Summary(m.group(0), int(m.group(1)), int(m.group(2)), int(m.group(3)), reasons, reassembled, fragments)


_counter = [0]


def run_tunsec(config: Path, direction: str, packets, workdir: Path, name: str | None = None,
               linktype: int = LINKTYPE_RAW) -> Run:
    """Write `packets` to a pcap, run `tunsec pcap`, read the result back."""
    _counter[0] += 1
    name = name or f"run{_counter[0]}"
    inp = workdir / f"{name}-{direction}-input.pcap"
    out = workdir / f"{name}-{direction}-output.pcap"
    write_pcap(inp, packets, linktype)
    cmd = [str(tunsec_bin()), "pcap", "--config", str(config), "--direction", direction, str(inp), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}"
    summary = parse_summary(proc.stderr)
    pkts = read_pcap(out, LINKTYPE_RAW)
    assert summary.read == len(packets), f"{summary.line}: fed {len(packets)} packets"
    assert summary.written == len(pkts), f"{summary.line}: output has {len(pkts)} packets"
    # Fragments merged into one datagram count once, as that datagram.
    merged = summary.fragments - summary.reassembled
    assert summary.read == summary.written + summary.dropped + merged, summary.line
    assert sum(summary.reasons.values()) == summary.dropped, summary.line
    return Run(pkts, summary, proc.stderr, out, inp)


def expect_summary(run: Run, read: int, written: int, **reasons: int) -> None:
    """Assert the exact summary line (reasons as keyword args, '-' as '_')."""
    reasons = {k.replace("_", "-"): v for k, v in reasons.items() if v}
    order = ["malformed", "fragment", "policy-discard", "no-sa", "unknown-spi", "icv-failure", "replay",
             "replay-old", "bad-padding", "decompress", "policy-mismatch", "plaintext-refused", "sa-expired",
             "seq-exhausted", "too-big", "encap-mismatch", "frag-overlap", "frag-duplicate", "frag-incomplete",
             "frag-limit", "not-ip"]
    dropped = sum(reasons.values())
    line = f"read {read}, written {written}, dropped {dropped}"
    if reasons:
        line += " (" + ", ".join(f"{r} {reasons[r]}" for r in order if r in reasons) + ")"
    assert run.summary.line == line, f"got {run.summary.line!r}, expected {line!r}\n{run.stderr}"


# --------------------------------------------------------------------------
# Packets
# --------------------------------------------------------------------------


def parse_ip(b: bytes) -> Packet:
    return IP(b) if b[0] >> 4 == 4 else IPv6(b)


def canonical(p: Packet) -> Packet:
    """Fill in lengths and checksums exactly as on the wire."""
    return parse_ip(bytes(p))


def is_v6(addr: str) -> bool:
    return ":" in addr


def text_payload(n: int, seed: int = 0) -> bytes:
    """Compressible, marker-bearing payload of exactly n bytes."""
    base = MARKER + b" %d lorem ipsum dolor sit amet, consectetur adipiscing elit; " % seed
    return (base * (n // len(base) + 1))[:n]


def random_payload(n: int, seed: int = 0) -> bytes:
    """Incompressible payload of n bytes, starting with the marker when it fits."""
    r = hashlib.shake_256(b"rnd%d" % seed).digest(n)
    return (MARKER + r)[:n] if n >= len(MARKER) else r


def l3(src: str, dst: str, **kw) -> Packet:
    if is_v6(src):
        return IPv6(src=src, dst=dst, hlim=kw.pop("ttl", 64), **kw)
    kw.setdefault("ttl", 64)
    return IP(src=src, dst=dst, **kw)


def ip_id(i: int) -> dict:
    return {"id": 0x1000 + i}


def icmp_echo(src: str, dst: str, i: int = 0, size: int = 56) -> Packet:
    if is_v6(src):
        return canonical(l3(src, dst) / ICMPv6EchoRequest(id=0x77, seq=i, data=text_payload(size, i)))
    return canonical(l3(src, dst, **ip_id(500 + i)) / ICMP(type=8, id=0x77, seq=i) / Raw(text_payload(size, i)))


def tcp_packet(src: str, dst: str, i: int, size: int, sport=40000, dport=80, rnd=False) -> Packet:
    pl = random_payload(size, i) if rnd else text_payload(size, i)
    extra = {} if is_v6(src) else ip_id(i)
    return canonical(l3(src, dst, **extra) / TCP(sport=sport + i, dport=dport, flags="PA", seq=1000 * i + 1, ack=7)
                     / Raw(pl))


def udp_packet(src: str, dst: str, i: int, size: int, sport=50000, dport=5353, rnd=False) -> Packet:
    pl = random_payload(size, i) if rnd else text_payload(size, i)
    extra = {} if is_v6(src) else ip_id(100 + i)
    return canonical(l3(src, dst, **extra) / UDP(sport=sport + i, dport=dport) / Raw(pl))


def traffic_mix(src: str, dst: str, big: bool = True) -> list[Packet]:
    """TCP, UDP and ICMP from tiny to ~1400 bytes, plus one ~8000-byte UDP."""
    pkts = []
    for i, n in enumerate([0, 1, 7, 60, 200, 777, 1400]):
        pkts.append(tcp_packet(src, dst, i, n, rnd=(i % 2 == 1)))
    for i, n in enumerate([0, 3, 100, 1350]):
        pkts.append(udp_packet(src, dst, i, n, rnd=(i == 3)))
    pkts.append(icmp_echo(src, dst, 1, 56))
    pkts.append(icmp_echo(src, dst, 2, 1200))
    if big:
        pkts.append(udp_packet(src, dst, 9, 8000))
    return pkts


def header_chain(b: bytes) -> list[str]:
    """Walk the headers of a raw packet (independently of tunsec and
    scapy): e.g. ['IPv6', 'HBH', 'AH', 'DST', 'UDP']. Stops at ESP, IPComp
    and upper layers (which end the list)."""
    if b[0] >> 4 == 4:
        ihl = (b[0] & 0xF) * 4
        chain, nh, off = ["IPv4"], b[9], ihl
    else:
        chain, nh, off = ["IPv6"], b[6], 40
    while True:
        chain.append(PROTO_NAMES.get(nh, str(nh)))
        if nh == PROTO_AH:
            nxt, ln = b[off], (b[off + 1] + 2) * 4
        elif nh in (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS) and chain[0] == "IPv6":
            nxt, ln = b[off], (b[off + 1] + 1) * 8
        elif nh == PROTO_FRAGMENT and chain[0] == "IPv6":
            nxt, ln = b[off], 8
        else:
            return chain
        nh, off = nxt, off + ln


def ipsec_offset(b: bytes, proto: int) -> int:
    """Offset of the first header of IP protocol `proto` in the chain."""
    v6 = b[0] >> 4 == 6
    nh, off = (b[6], 40) if v6 else (b[9], (b[0] & 0xF) * 4)
    while nh != proto:
        if nh == PROTO_AH:
            nh, off = b[off], off + (b[off + 1] + 2) * 4
        elif v6 and nh in (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS):
            nh, off = b[off], off + (b[off + 1] + 1) * 8
        else:
            raise AssertionError(f"no protocol {proto} in {header_chain(b)}")
    return off


def ip_checksum(hdr: bytes) -> int:
    s = 0
    if len(hdr) % 2:
        hdr += b"\0"
    for (w,) in struct.iter_unpack("!H", hdr):
        s += w
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def fix_ipv4_checksum(b: bytes) -> bytes:
    if b[0] >> 4 != 4:
        return b
    ihl = (b[0] & 0xF) * 4
    h = bytearray(b[:ihl])
    h[10:12] = b"\0\0"
    h[10:12] = struct.pack("!H", ip_checksum(bytes(h)))
    return bytes(h) + b[ihl:]


def flip(b: bytes, offset: int, mask: int = 0x01) -> bytes:
    x = bytearray(b)
    x[offset] ^= mask
    return bytes(x)


# --------------------------------------------------------------------------
# scapy as the peer: open (verify + decrypt) and seal
# --------------------------------------------------------------------------


def scapy_open(data: bytes, bundle: Bundle, seq: int | None = None, ipcomp_expected: bool | None = None) -> bytes:
    """Verify and strip AH and ESP (outermost first) with scapy, then inflate
    IPComp with zlib. Asserts header order IP.. | AH | ESP | IPComp and
    SPIs/sequence numbers. Returns the recovered packet bytes."""
    pkt = parse_ip(data)
    for sa in reversed(bundle.sas):
        if sa.proto == "ipcomp":
            continue
        layer = AH if sa.proto == "ah" else ESP
        proto = PROTO_AH if sa.proto == "ah" else PROTO_ESP
        off = ipsec_offset(bytes(pkt), proto)  # raises unless it is the next IPsec header
        b = bytes(pkt)
        spi, sseq = struct.unpack("!II", b[off + 4: off + 12]) if proto == PROTO_AH else struct.unpack(
            "!II", b[off: off + 8])
        assert spi == sa.spi, f"{sa.proto} SPI {spi:#x}, expected {sa.spi:#x}"
        if seq is not None:
            assert sseq == seq, f"{sa.proto} sequence {sseq}, expected {seq}"
        assert pkt.haslayer(layer)
        pkt = sa.scapy().decrypt(pkt)  # raises IPSecIntegrityError on a bad ICV
        pkt = parse_ip(bytes(pkt))
    comp = bundle.get("ipcomp")
    b = bytes(pkt)
    has_comp = PROTO_IPCOMP in _next_protos(b)
    if ipcomp_expected is not None:
        assert has_comp == ipcomp_expected, f"IPComp header present: {has_comp}, expected {ipcomp_expected}"
    if has_comp:
        assert comp is not None, "IPComp header but no IPComp SA in the bundle"
        b = ipcomp_decompress(b, comp.wire_cpi)
    return b


def _next_protos(b: bytes) -> list[int]:
    """Protocol numbers along the header chain (for presence tests)."""
    names = header_chain(b)
    rev = {v: k for k, v in PROTO_NAMES.items()}
    return [rev.get(n, -1) for n in names[1:]]


def ah_sign(pkt: Packet, sa: SA, sending: bool = True, esn_hi: int | None = None) -> Packet:
    """Compute the AH ICV of a packet that already contains an AH layer
    (zero ICV, any placement), with scapy's own mutable-field zeroing and
    MAC. This is the AH-over-ESP workaround: scapy's AuthAlgo.sign tests for
    ESP before AH and would MAC the ESP part with the AH key instead."""
    algo = AUTH_ALGOS[AUTH[sa.auth][0]]
    p = canonical(pkt)
    ah = p[AH]
    icv_field = len(ah.icv) + len(ah.padding)
    ah.icv = b"\0" * icv_field
    ah.padding = b""
    z = zero_mutable_fields(p.copy(), sending=sending)
    mac = algo.new_mac(sa.auth_key)
    mac.update(bytes(z))
    if esn_hi is not None:  # RFC 4302 2.5.1: the high half, implicitly, after the packet
        mac.update(struct.pack("!L", esn_hi))
    icv = mac.finalize()[: algo.icv_size]
    p[AH].icv = icv + b"\0" * (icv_field - len(icv))
    return canonical(p)


def ah_header(sa: SA, nh: int, seq: int, v6: bool) -> AH:
    icv_size = AUTH[sa.auth][2]
    ah = AH(nh=nh, spi=sa.spi, seq=seq, icv=b"\0" * icv_size)
    align = 8 if v6 else 4
    if len(ah) % align:
        ah.padding = b"\0" * (-len(ah) % align)
    ah.payloadlen = len(ah) // 4 - 2
    return ah


def ah_encrypt_manual(pkt: Packet, sa: SA, seq: int, esn_hi: int | None = None) -> Packet:
    """AH in transport mode at scapy's own insertion point, payload kept
    opaque (so an inner ESP header is not mistaken for the thing to sign)."""
    hdr, nh, payload = split_for_transport(canonical(pkt), PROTO_AH)
    v6 = hdr.version == 6
    whole = hdr / ah_header(sa, nh, seq, v6) / Raw(bytes(payload))
    return ah_sign(whole, sa, esn_hi=esn_hi)


def scapy_seal(pkt: Packet, bundle: Bundle, seq: int, deflate: bool | None = None) -> Packet:
    """Protect `pkt` with the bundle as the peer would: IPComp (Python zlib,
    if `deflate`), ESP (scapy), AH (scapy, or the workaround above when the
    payload is ESP or IPComp)."""
    p = canonical(pkt)
    for sa in bundle.sas:
        if sa.proto == "ipcomp":
            if deflate:
                p = ipcomp_compress(p, sa.wire_cpi)
        elif sa.proto == "esp":
            p = canonical(sa.scapy().encrypt(p, seq_num=seq))
        else:
            inner = _next_protos(bytes(p))
            if PROTO_ESP in inner or PROTO_IPCOMP in inner:
                p = ah_encrypt_manual(p, sa, seq)
            else:
                p = canonical(sa.scapy().encrypt(p, seq_num=seq))
    return p


def scapy_verify_ah(data: bytes, sa: SA) -> None:
    """Raise unless scapy verifies the AH ICV."""
    pkt = parse_ip(data)
    sa.scapy().auth_algo.verify(pkt, sa.auth_key)


# --------------------------------------------------------------------------
# IPComp with Python's zlib (raw DEFLATE, RFC 1951)
# --------------------------------------------------------------------------


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(level=6, wbits=-15)
    return c.compress(data) + c.flush()


def inflate_raw(data: bytes) -> bytes:
    d = zlib.decompressobj(wbits=-15)
    out = d.decompress(data) + d.flush()
    assert d.eof, "DEFLATE stream does not end"
    assert d.unused_data == b"", "bytes after the end of the DEFLATE stream"
    return out


def _layer_with_next(pkt: Packet, proto: int) -> Packet:
    """The scapy layer whose next-protocol field names `proto`."""
    layer = pkt
    while not isinstance(layer, NoPayload):
        fname = "proto" if isinstance(layer, IP) else "nh"
        if fname in layer.fields or fname in [f.name for f in layer.fields_desc]:
            if layer.getfieldval(fname) == proto:
                return layer
        layer = layer.payload
    raise AssertionError(f"no header names protocol {proto}")


def _fix_lengths(pkt: Packet) -> Packet:
    if isinstance(pkt, IP):
        del pkt.len
        del pkt.chksum
    else:
        del pkt.plen
    return canonical(pkt)


def ipcomp_decompress(b: bytes, cpi: int) -> bytes:
    """Remove the IPComp header (next header, flags, CPI) and inflate."""
    pkt = parse_ip(b)
    layer = _layer_with_next(pkt, PROTO_IPCOMP)
    data = bytes(layer.payload)
    nh, flags, wire_cpi = struct.unpack("!BBH", data[:4])
    assert flags == 0, f"IPComp flags {flags}"
    assert wire_cpi == cpi, f"IPComp CPI {wire_cpi}, expected {cpi}"
    inflated = inflate_raw(data[4:])
    layer.setfieldval("proto" if isinstance(layer, IP) else "nh", nh)
    layer.remove_payload()
    layer.add_payload(Raw(inflated))
    return bytes(_fix_lengths(pkt))


def ipcomp_compress(pkt: Packet, cpi: int = 2) -> Packet:
    """Compress the payload at the transport-mode insertion point (scapy's
    split) and prepend an IPComp header."""
    hdr, nh, payload = split_for_transport(canonical(pkt), PROTO_IPCOMP)
    comp = deflate_raw(bytes(payload))
    return canonical(hdr / Raw(struct.pack("!BBH", nh, 0, cpi) + comp))


# --------------------------------------------------------------------------
# tshark and tcpdump
# --------------------------------------------------------------------------


def tshark_fields(pcap: Path, sas: list[SA], fields: list[str], extra: list[str] | None = None) -> list[list[str]]:
    cmd = ["tshark", "-n", "-r", str(pcap),
           "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE"]
    for sa in sas:
        cmd += ["-o", sa.tshark_uat()]
    # Inner dissectors off: an exception there would hide the ICV verdict.
    cmd += ["--disable-protocol", "tcp", "--disable-protocol", "udp", "--disable-protocol", "icmp",
            "--disable-protocol", "icmpv6"]
    cmd += extra or []
    cmd += ["-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in fields:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"tshark failed: {proc.stderr}"
    return [line.split("|") for line in proc.stdout.splitlines()]


def tcpdump_lines(pcap: Path) -> list[str]:
    proc = subprocess.run(["tcpdump", "-nr", str(pcap)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"tcpdump failed: {proc.stderr}"
    return proc.stdout.splitlines()


# The seed's tcpdump line, e.g.
#   IP6 2001:470:1f09:11ed::c > 2001:470:1f09:11ed::42: AH(spi=0x303bfcdc,seq=0x29e6): ESP(spi=0xadb71052,seq=0x29e6), length 116
# tcpdump >= 4.99 also prints the AH ICV (",icv=0x..."), which the 2016
# capture's tcpdump did not.
AH_ESP_LINE = re.compile(
    r"AH\(spi=0x(?P<ahspi>[0-9a-f]{8}),seq=0x(?P<ahseq>[0-9a-f]+)(?:,icv=0x(?P<icv>[0-9a-f]+))?\): "
    r"ESP\(spi=0x(?P<espspi>[0-9a-f]{8}),seq=0x(?P<espseq>[0-9a-f]+)\), length (?P<len>\d+)"
)
