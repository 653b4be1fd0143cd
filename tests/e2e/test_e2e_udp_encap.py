"""Scenario `gcm-udp`: ESP aes-gcm-16 in UDP (RFC 3948, setkey's esp-udp)
between two daemons, IPv4 and IPv6.

TCP crosses intact both ways; the wire carries UDP to port 4500 only, and
tshark's UDPENCAP + ESP dissectors decrypt it and check every ICV. IKE's
own datagrams (non-ESP marker) on the same port still reach the
application listening there (the IKE daemon's place), while no ESP in UDP
does and the kernel answers none with ICMP.
"""

import socket
import struct
import subprocess
import time
from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether

from e2elib import (
    A4, A6, B4, B6, IFACE_A, IFACE_B, PROTO_ICMP, PY, Capture, between, find_sa, ip_packets, make_topology, read_pcap,
    mkconf, parse_sas, tcp_transfer_check, tcp_transfer_start, tshark_uat, write_pcap,
)

MB = 1_000_000


def split_super_frames(frames: list[bytes]) -> tuple[list[bytes], int]:
    """Cut UDP GSO super-frames (a capture on the sender's veth sees
    them whole: IP payload longer than the UDP length, which names each
    datagram's size) into the datagrams the receiver gets, as tunsec does.
    Returns the frames and how many were super-frames."""
    out, supers = [], 0
    for fr in frames:
        et = struct.unpack("!H", fr[12:14])[0]
        ip = fr[14:]
        if et == 0x0800 and ip[9] == PROTO_UDP:
            ihl, v6 = (ip[0] & 0xF) * 4, False
        elif et == 0x86DD and ip[6] == PROTO_UDP:
            ihl, v6 = 40, True
        else:
            out.append(fr)
            continue
        ulen = struct.unpack("!H", ip[ihl + 4: ihl + 6])[0]
        body = ip[ihl + 8:]
        if len(body) <= ulen - 8:
            out.append(fr)
            continue
        supers += 1
        seg = ulen - 8
        for at in range(0, len(body), seg):
            part = body[at: at + seg]
            h = bytearray(fr[:14] + ip[: ihl + 8])
            h[14 + ihl + 4: 14 + ihl + 6] = struct.pack("!H", 8 + len(part))
            if v6:
                h[14 + 4: 14 + 6] = struct.pack("!H", 8 + len(part))
            else:
                h[14 + 2: 14 + 4] = struct.pack("!H", ihl + 8 + len(part))
            out.append(bytes(h) + part)
    return out, supers
PROTO_UDP = 17
PROTO_ICMPV6 = 58


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "u")
    a_conf, b_conf = mkconf("gcm-udp", topo.workdir / "conf")
    topo.sas = parse_sas(a_conf)
    assert "esp-udp" in a_conf.read_text()
    topo.da = topo.daemon(topo.a, a_conf).start()
    topo.db = topo.daemon(topo.b, b_conf).start()
    return topo


def test_tcp_crosses_in_udp_and_tshark_verifies_it(net, tmp_path):
    size = 8 * MB
    pcap = tmp_path / "udp.pcap"
    cap = Capture(net, net.a, IFACE_A, pcap, count=3000)
    ca0, cb0 = net.da.counters(settle=0), net.db.counters(settle=0)
    runs = [tcp_transfer_start(net, net.a, net.b, B4, 5801, size),
            tcp_transfer_start(net, net.b, net.a, A4, 5802, size),
            tcp_transfer_start(net, net.a, net.b, B6, 5803, size)]
    for tx, rx in runs:
        tcp_transfer_check(tx, rx, size)
    cap.stop()
    ca1, cb1 = net.da.counters(), net.db.counters()
    for d0, d1, who in ((ca0, ca1, "A"), (cb0, cb1, "B")):
        assert d1["dropped"] == d0["dropped"], f"{who} dropped packets: {d0.line} -> {d1.line}"
        assert d1["out_bytes"] - d0["out_bytes"] >= size, f"{who}: {d0.line} -> {d1.line}"

    frames, supers = split_super_frames(read_pcap(pcap)[1])
    # Bulk TCP leaves as UDP GSO super-packets (see src/daemon/gso.rs).
    assert supers >= 50, f"{supers} UDP GSO super-packets"
    pcap = write_pcap(tmp_path / "split.pcap", frames)
    pkts = between(ip_packets(pcap), A4, B4) + between(ip_packets(pcap), A6, B6)
    kinds = Counter()
    for p in pkts:
        if p.proto == PROTO_UDP:
            sport, dport = int.from_bytes(p.payload[0:2], "big"), int.from_bytes(p.payload[2:4], "big")
            kinds[f"udp {sport}->{dport}"] += 1
        else:
            kinds[f"proto {p.proto}"] += 1
    assert set(kinds) == {"udp 4500->4500"}, kinds
    assert kinds["udp 4500->4500"] >= 2000, kinds

    fields = ["ip.src", "ipv6.src", "esp.spi", "esp.icv_good", "esp.icv_bad", "esp.protocol"]
    cmd = ["tshark", "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE"]
    for sa in net.sas:
        cmd += ["-o", tshark_uat(sa)]
    cmd += ["--disable-protocol", "tcp", "-Y", "esp", "-T", "fields", "-E", "separator=|", "-E", "occurrence=f"]
    for f in fields:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines()]
    assert len(rows) == kinds["udp 4500->4500"], f"tshark saw {len(rows)} ESP packets"
    for r in rows:
        assert r["esp.icv_good"] in ("1", "True") and r["esp.icv_bad"] in ("", "0", "False"), r
        assert int(r["esp.protocol"], 0) == 6, r


def test_ike_on_the_nat_t_port_reaches_its_listener_and_esp_does_not(net, tmp_path):
    """B listens on UDP 4500 as an IKE daemon would. A sends IKE-shaped
    datagrams from port 4500 (a zero non-ESP marker) and a keepalive, while
    TCP in ESP-in-UDP flows: the listener gets exactly the IKE datagrams
    and the keepalive, and nobody answers the ESP with ICMP."""
    pcap = tmp_path / "ike.pcap"
    cap = Capture(net, net.a, IFACE_A, pcap)
    listener = net.spawn(net.b, ["python3", "-u", "-c", (
        "import socket,select,time,json\n"
        "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n"
        "s.bind(('::',4500)); print('READY',flush=True)\n"
        "got=[]; end=time.monotonic()+12\n"
        "while time.monotonic()<end and len(got)<5:\n"
        "  r,_,_=select.select([s],[],[],0.1)\n"
        "  if r: b,p=s.recvfrom(65535); got.append(b.hex())\n"
        "print(json.dumps({'got':got}),flush=True)\n")], name="ike-listener")
    listener.wait_ready()
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5804, 4 * MB)
    ike = [bytes(4) + b"IKE_SA_INIT-%d" % i for i in range(2)]
    for dst in (B4, B6):
        net.run(net.a, "python3", "-c", (
            "import socket\n"
            f"s=socket.socket(socket.AF_INET{'6' if ':' in dst else ''},socket.SOCK_DGRAM)\n"
            "s.bind(('', 4500))\n"
            f"s.sendto({ike[0 if dst == B4 else 1]!r}, ('{dst}', 4500))\n"
            f"s.sendto(b'\\xff', ('{dst}', 4500))\n"))
    tcp_transfer_check(tx, rx, 4 * MB)
    got = [bytes.fromhex(h) for h in listener.result(30)["got"]]
    cap.stop()
    assert sorted(got) == sorted(ike + [b"\xff", b"\xff"]), got
    # Destination unreachable: ICMP type 3, ICMPv6 type 1.
    unreach = [p for p in ip_packets(pcap)
               if (p.proto, p.payload[0]) in ((PROTO_ICMP, 3), (PROTO_ICMPV6, 1))]
    assert unreach == [], f"{len(unreach)} ICMP unreachables: the kernel answered ESP in UDP"


def test_an_sa_this_host_cannot_receive_is_refused(net, tmp_path):
    """tunsec takes ESP in UDP in on port 4500 only: an SA whose end at
    this host is another port would never see a packet, so it is refused
    (with the SA named) and nothing changes; the peer's port may be
    anything (a NAT picks it)."""
    from e2elib import tunsec_bin

    def setkey(text):
        return subprocess.run([str(tunsec_bin()), "setkey", "--control", str(net.db.control), "-c"], input=text,
                              capture_output=True, text=True, timeout=30)

    key = "0x" + "ab" * 20
    before = setkey("dump;\n").stdout
    # To B (local) on 4501: B would never receive it.
    r = setkey(f"add {A4}[4500] {B4}[4501] esp-udp 0x7001 -E aes-gcm-16 {key};\n")
    assert r.returncode != 0, r.stdout
    err = r.stdout + r.stderr
    assert f"esp-udp SA {A4}[4500] -> {B4}[4501] spi 0x7001" in err and "port 4500 only" in err, err
    # 4500 at neither end: B's end is not 4500 whichever it is.
    r = setkey(f"add {B4}[4600] {A4}[4601] esp-udp 0x7002 -E aes-gcm-16 {key};\n")
    assert r.returncode != 0 and "port 4500 only" in r.stdout + r.stderr, r.stdout + r.stderr
    assert setkey("dump;\n").stdout == before
    # From B to a NATed peer's port 31337: fine (B's end is 4500).
    r = setkey(f"add {B4}[4500] {A4}[31337] esp-udp 0x7003 -E aes-gcm-16 {key};\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert setkey(f"delete {B4} {A4} esp-udp 0x7003;\n").returncode == 0
    # And a file with such an SA does not start.
    conf = tmp_path / "bad.conf"
    conf.write_text(f"add {A4}[4500] {B4}[4501] esp-udp 0x7004 -E aes-gcm-16 {key};\n")
    r = net.run(net.b, str(tunsec_bin()), "run", "--config", str(conf), "--tun", "tsbad0", "--control",
                str(tmp_path / "bad.sock"), check=False, timeout=30)
    assert r.returncode != 0 and f"{conf}: esp-udp SA {A4}[4500] -> {B4}[4501]" in r.stderr, r.stderr


# B's daemon only: what A's namespace sends goes onto the veth as it is.
@pytest.fixture(scope="module")
def b_only(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "un")
    a_conf, b_conf = mkconf("gcm-udp", topo.workdir / "conf")
    topo.sas = parse_sas(a_conf)
    topo.db = topo.daemon(topo.b, b_conf).start()
    return topo


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_a_nated_peers_tcp_checksum_is_not_verified_after_esp_in_udp(b_only, fam):
    """RFC 3948 3.1.2: behind a NAT, the peer's TCP checksum covers its
    own (private) address, not the one B sees. Linux marks such packets
    CHECKSUM_UNNECESSARY; tunsec hands them to its TUN device as
    NEEDS_CSUM with a fresh pseudo-header sum (src/gro.rs). A SYN sealed
    by scapy with the A->B SA, its checksum computed for another source,
    must reach B's listener (a SYN-RECV entry) and count no checksum error
    in B's kernel."""
    net = b_only
    port = 5811 if fam == "v4" else 5812
    a, b = (A4, B4) if fam == "v4" else (A6, B6)
    private = "192.168.77.5" if fam == "v4" else "fd00:77::5"
    sa = find_sa(net.sas, a, b, "esp")
    assert sa.enc == "aes-gcm-16"
    # The SYN as the peer built it, then its source rewritten as a NAT
    # does, the TCP checksum left alone.
    l3 = IP(src=private, dst=b) if fam == "v4" else IPv6(src=private, dst=b)
    raw = bytearray(bytes(l3 / TCP(sport=40000, dport=port, flags="S", seq=1000)))
    if fam == "v4":
        raw[12:16] = socket.inet_pton(socket.AF_INET, a)
        syn = IP(bytes(raw))
        del syn.chksum  # the IP header's, computed again; TCP's stays
    else:
        raw[8:24] = socket.inet_pton(socket.AF_INET6, a)
        syn = IPv6(bytes(raw))
    syn = syn.__class__(bytes(syn))
    fresh = syn.copy()
    del fresh[TCP].chksum
    assert syn[TCP].chksum != fresh.__class__(bytes(fresh))[TCP].chksum, "stale for A's address"
    ssa = SecurityAssociation(ESP, spi=sa.spi, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(sa.enc_key[2:]),
                              seq_num=100 + port, nat_t_header=UDP(sport=4500, dport=4500))
    wire = bytes(ssa.encrypt(syn))

    listener = subprocess.Popen(
        ["ip", "netns", "exec", net.b, PY, "-c",
         "import socket,sys,time\n"
         f"s=socket.socket(socket.AF_INET{'6' if fam == 'v6' else ''})\n"
         f"s.bind(('{b}',{port}));s.listen(8);print('ready',flush=True);time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        errors0 = tcp_csum_errors(net)
        eth = Ether(src=net.mac(net.a, IFACE_A), dst=net.mac(net.b, IFACE_B))
        l3 = IP(wire) if fam == "v4" else IPv6(wire)
        pcap = write_pcap(net.workdir / f"nat-syn-{fam}.pcap", [bytes(eth / l3)])
        assert net.tool(net.a, "inject", "--iface", IFACE_A, str(pcap)).result(30)["sent"] == 1
        deadline = time.monotonic() + 5
        seen = ""
        while time.monotonic() < deadline:
            seen = net.run(net.b, "ss", "-Htn", "state", "syn-recv").stdout
            if f":{port}" in seen:
                break
            time.sleep(0.1)
        assert f":{port}" in seen, f"no SYN-RECV on port {port}: {seen!r}\n{net.db.log()[-2000:]}"
        assert tcp_csum_errors(net) == errors0, "B's kernel counted a TCP checksum error"
    finally:
        listener.kill()
        listener.wait()


def tcp_csum_errors(net) -> int:
    """B's kernel's TCP InCsumErrors (IPv4 and IPv6 share the counter)."""
    snmp = net.run(net.b, "cat", "/proc/net/snmp").stdout.splitlines()
    heads, values = [l.split() for l in snmp if l.startswith("Tcp:")]
    return int(values[heads.index("InCsumErrors")])
