"""Scenario `windows` (the seed's Linux-to-Windows setup: ESP aes-cbc +
hmac-sha1 under AH hmac-sha1, ICMP bypassed, IPv4 and IPv6) between two
namespaces: bulk TCP both ways, UDP, ping, and what the wire shows.
"""

import os
import secrets
import subprocess
import sys
from collections import Counter, defaultdict

import nettool
import pytest

from e2elib import (
    A4, A6, AH_ESP_LINE, B4, B6, IFACE_A, PROTO_AH, PROTO_ESP, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    Capture, between, find_sa, ip_packets, make_topology, mkconf, parse_sas, ping, tcp_transfer_check,
    tcp_transfer_start, tcpdump_read, tshark_esp, tunsec_bin,
)

FAMILIES = {"v4": (A4, B4), "v6": (A6, B6)}
MB = 1_000_000


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "1")
    a_conf, b_conf = mkconf("windows", topo.workdir / "conf")
    topo.sas = parse_sas(a_conf)
    topo.da = topo.daemon(topo.a, a_conf).start()
    topo.db = topo.daemon(topo.b, b_conf).start()
    return topo


def assert_running(net):
    for d in (net.da, net.db):
        assert d.alive(), f"tunsec in {d.ns} died:\n{d.log()}"
        assert "panicked" not in d.log(), d.log()


@pytest.mark.parametrize("fam", FAMILIES)
def test_tcp_50mb_each_way_arrives_intact(net, fam):
    a, b = FAMILIES[fam]
    size = 50 * MB
    ca0, cb0 = net.da.counters(settle=0), net.db.counters(settle=0)
    ab = tcp_transfer_start(net, net.a, net.b, b, 5001, size)
    ba = tcp_transfer_start(net, net.b, net.a, a, 5002, size)
    tcp_transfer_check(*ab, size)
    tcp_transfer_check(*ba, size)
    ca1, cb1 = net.da.counters(), net.db.counters()
    # The bytes went through tunsec, protected one way and verified the other.
    for d0, d1, who in ((ca0, ca1, "A"), (cb0, cb1, "B")):
        assert d1["out_bytes"] - d0["out_bytes"] >= size, f"{who} protected too little: {d0.line} -> {d1.line}"
        assert d1["in_bytes"] - d0["in_bytes"] >= size, f"{who} verified too little: {d0.line} -> {d1.line}"
        assert d1["dropped"] == d0["dropped"], f"{who} dropped packets: {d0.line} -> {d1.line}"
        assert d1["net_tx_errors"] == d0["net_tx_errors"] and d1["tun_tx_errors"] == d0["tun_tx_errors"], d1.line
    assert_running(net)


@pytest.mark.parametrize("fam", FAMILIES)
def test_udp_datagrams_arrive_intact(net, fam):
    a, b = FAMILIES[fam]
    marker = "TUNSEC-E2E-UDP-" + secrets.token_hex(6)
    n = 300
    results = []
    for src_ns, dst_ns, dst, port in ((net.a, net.b, b, 6001), (net.b, net.a, a, 6002)):
        rx = net.tool(dst_ns, "udp-recv", "--bind", dst, "--port", str(port), "--count", str(n), "--marker", marker)
        rx.wait_ready()
        tx = net.tool(src_ns, "udp-send", "--to", dst, "--port", str(port), "--count", str(n), "--marker", marker)
        results.append((tx.result(60), rx.result(60)))
    for sent, got in results:
        assert sent["sent"] == n
        assert got["bad"] == [], f"corrupted datagrams: {got['bad'][:5]}"
        assert got["duplicates"] == {}, got["duplicates"]
        assert got["received"] == list(range(n)), f"missing: {sorted(set(range(n)) - set(got['received']))}"
        assert got["with_marker"] == n // 3
    assert_running(net)


def test_oversized_udp_is_dropped_as_fragments_and_explained_once(net):
    # A datagram above the TUN MTU reaches tunsec as kernel-made fragments,
    # which transport mode cannot protect: counted, and said once in the log.
    c0 = net.da.counters(settle=0)
    send = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"[s.sendto(b'x' * 3000, ('{B4}', 9)) for _ in range(2)]")
    net.run(net.a, sys.executable, "-c", send, check=False)
    c1 = net.da.counters()
    assert c1["fragment"] - c0["fragment"] >= 4, f"{c0.line} -> {c1.line}"
    assert c1["dropped"] - c0["dropped"] == c1["fragment"] - c0["fragment"], f"{c0.line} -> {c1.line}"
    log = net.da.log()
    assert log.count("dropping outbound IP fragments") == 1, log
    assert f"({A4} -> {B4})" in log and "TUN MTU of " in log, log
    assert_running(net)


@pytest.mark.parametrize("fam", FAMILIES)
def test_ping_both_ways(net, fam):
    a, b = FAMILIES[fam]
    ping(net, net.a, b, count=3)
    ping(net, net.b, a, count=3)


def test_wire_shows_only_ah_esp_and_tshark_verifies(net, tmp_path):
    """During TCP, UDP and ping traffic in both directions and families, the
    veth carries AH+ESP for everything but ICMP; the payload marker never
    shows; tcpdump prints AH(...): ESP(...) with the configured SPIs; tshark,
    given the keys, decrypts every ESP packet, finds the marker inside and
    reports ICV good."""
    marker = "TUNSEC-E2E-SECRET-" + secrets.token_hex(8)
    pcap = tmp_path / "wire.pcap"
    cap = Capture(net, net.a, IFACE_A, pcap)
    size = 2 * MB
    transfers = []
    for fam, (a, b) in FAMILIES.items():
        port = 5100 if fam == "v4" else 5200
        transfers.append(tcp_transfer_start(net, net.a, net.b, b, port + 1, size, marker=marker))
        transfers.append(tcp_transfer_start(net, net.b, net.a, a, port + 2, size, marker=marker))
    for tx, rx in transfers:
        tcp_transfer_check(tx, rx, size)
    udp = []
    for fam, (a, b) in FAMILIES.items():
        for src_ns, dst_ns, dst, port in ((net.a, net.b, b, 6101), (net.b, net.a, a, 6102)):
            rx = net.tool(dst_ns, "udp-recv", "--bind", dst, "--port", str(port), "--count", "60", "--marker", marker)
            rx.wait_ready()
            net.tool(src_ns, "udp-send", "--to", dst, "--port", str(port), "--count", "60", "--marker", marker).result()
            udp.append(rx.result())
        ping(net, net.a, b, count=2)
    stderr = cap.stop()
    for got in udp:
        assert got["received"] == list(range(60)) and got["bad"] == [], got

    pkts = ip_packets(pcap)
    protected = []
    for fam, (a, b) in FAMILIES.items():
        icmp = PROTO_ICMP if fam == "v4" else PROTO_ICMPV6
        flows = between(pkts, a, b)
        clear = [p for p in flows if p.proto in (PROTO_TCP, PROTO_UDP)]
        assert clear == [], f"{fam}: {len(clear)} TCP/UDP packets in the clear, e.g. {clear[0].ip[:60].hex()}"
        other = [p for p in flows if not (p.proto == icmp or (p.proto == PROTO_AH and p.payload[0] == PROTO_ESP))]
        assert other == [], f"{fam}: unexpected packets: {Counter(p.proto for p in other)}"
        ah = [p for p in flows if p.proto == PROTO_AH]
        assert len([p for p in ah if p.src == a]) >= size // 1400, f"{fam}: too few protected packets A->B"
        assert len([p for p in ah if p.src == b]) >= size // 1400, f"{fam}: too few protected packets B->A"
        assert any(p.proto == icmp for p in flows), f"{fam}: no plain ICMP seen"
        protected += ah

    # The marker is nowhere on the wire, neither in the file nor as tcpdump shows it.
    assert marker.encode() not in pcap.read_bytes()
    assert marker not in tcpdump_read(pcap, "-A")

    # tcpdump: one AH(...): ESP(...) line per protected packet, the SPIs of the config
    lines = [ln for ln in tcpdump_read(pcap).splitlines() if "AH(" in ln]
    assert len(lines) == len(protected), f"{len(lines)} AH lines, {len(protected)} AH packets"
    seqs = defaultdict(list)
    for ln in lines:
        m = AH_ESP_LINE.search(ln)
        assert m, f"not an AH(...): ESP(...) line: {ln}"
        ah_sa = find_sa(net.sas, m["src"], m["dst"], "ah")
        esp_sa = find_sa(net.sas, m["src"], m["dst"], "esp")
        assert int(m["ahspi"], 16) == ah_sa.spi, ln
        assert int(m["espspi"], 16) == esp_sa.spi, ln
        # The two SAs count together, as in the seed's lines; with two
        # workers protecting packets of one SA pair at once, their
        # increments may interleave by one, never drift apart.
        assert abs(int(m["ahseq"], 16) - int(m["espseq"], 16)) <= 2, f"AH and ESP sequence numbers drift: {ln}"
        seqs[esp_sa.spi].append(int(m["espseq"], 16))
        seqs[ah_sa.spi].append(int(m["ahseq"], 16))
    assert len(seqs) == 8, f"expected the 4 ESP and 4 AH SAs (2 directions x 2 families): {list(seqs)}"
    for spi, s in seqs.items():
        dup = [k for k, v in Counter(s).items() if v > 1]
        assert dup == [], f"SPI {spi:#x}: sequence numbers sent twice: {dup[:10]}"

    # tshark decrypts and verifies every ESP packet
    fields = ["frame.number", "esp.spi", "esp.sequence", "esp.icv_good", "esp.icv_bad", "esp.protocol", "data.data"]
    rows = tshark_esp(pcap, net.sas, fields)
    assert len(rows) == len(protected), f"tshark saw {len(rows)} ESP packets of {len(protected)}"
    esp_spis = {f"0x{s.spi:08x}" for s in net.sas if s.proto == "esp"}
    with_marker = 0
    for r in rows:
        assert r["esp.spi"] in esp_spis, r["frame.number"]
        assert r["esp.icv_good"] in ("1", "True"), f"frame {r['frame.number']}: ICV not good: {r}"
        assert r["esp.icv_bad"] in ("", "0", "False"), f"frame {r['frame.number']}: {r}"
        assert int(r["esp.protocol"], 0) in (PROTO_TCP, PROTO_UDP), f"frame {r['frame.number']}: {r['esp.protocol']}"
        if marker.encode().hex() in r["data.data"].replace(":", "").lower():
            with_marker += 1
    assert with_marker >= 2 * (size // 1400), f"the marker shows in only {with_marker} decrypted packets"
    assert_running(net)


def test_icmp_is_bypassed_in_the_clear(net, tmp_path):
    """ping passes unprotected (priority 10 `none` policies): the capture shows
    exactly the echo requests and replies, plain; A's daemon counts its own
    outgoing ones as bypassed and protects none of them."""
    c0 = net.da.counters()
    pcap = tmp_path / "icmp.pcap"
    cap = Capture(net, net.a, IFACE_A, pcap)
    n = 4
    for a, b in FAMILIES.values():
        ping(net, net.a, b, count=n)
        ping(net, net.b, a, count=n)
    cap.stop()
    c1 = net.da.counters()
    pkts = ip_packets(pcap)
    for fam, (a, b) in FAMILIES.items():
        if fam == "v4":
            icmp, req, rep = PROTO_ICMP, 8, 0
        else:
            icmp, req, rep = PROTO_ICMPV6, 128, 129
        echo = [p for p in between(pkts, a, b) if p.proto == icmp and p.payload[0] in (req, rep)]
        kinds = Counter((p.src, p.payload[0]) for p in echo)
        assert kinds == {(a, req): n, (b, rep): n, (b, req): n, (a, rep): n}, f"{fam}: {kinds}"
    assert c1["bypassed"] - c0["bypassed"] == 4 * n, f"{c0.line} -> {c1.line}"
    assert c1["out_packets"] == c0["out_packets"], f"ICMP was protected: {c0.line} -> {c1.line}"
    assert c1["dropped"] == c0["dropped"], f"{c0.line} -> {c1.line}"


def test_wireshark_decrypts_with_the_sa_file_tunsec_writes(net, tmp_path):
    """`tunsec setkey -D --wireshark` writes Wireshark's esp_sa file: with
    only that file in its configuration directory, tshark decrypts a
    capture of the veth and sees the inner TCP and UDP, markers and all."""
    marker = "TUNSEC-E2E-WS-" + secrets.token_hex(6)
    cap = Capture(net, net.a, IFACE_A, tmp_path / "ws.pcap")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5011, 200_000, text=True, marker=marker)
    tcp_transfer_check(tx, rx, 200_000)
    urx = net.tool(net.a, "udp-recv", "--bind", A6, "--port", "6011", "--count", "30", "--marker", marker)
    urx.wait_ready()
    utx = net.tool(net.b, "udp-send", "--to", A6, "--port", "6011", "--count", "30", "--marker", marker)
    utx.result(60)
    urx.result(60)
    cap.stop()

    r = subprocess.run([str(tunsec_bin()), "setkey", "-D", "--wireshark", "--control", str(net.da.control)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    esp = [s for s in net.sas if s.proto == "esp"]
    assert len(lines) == len(esp) == 4, r.stdout
    for sa in esp:
        assert any(f'"{sa.src}","{sa.dst}","0x{sa.spi:08x}","AES-CBC [RFC3602]","{sa.enc_key}",'
                   f'"HMAC-SHA-1-96 [RFC2404]","{sa.auth_key}"' in line for line in lines), (sa, lines)
    conf = tmp_path / "wireshark"
    conf.mkdir()
    (conf / "esp_sa").write_text(r.stdout)

    def tshark(*args):
        env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(conf)}
        p = subprocess.run(["tshark", "-n", "-r", str(tmp_path / "ws.pcap"),
                            "-o", "esp.enable_encryption_decode:TRUE",
                            "-o", "esp.enable_authentication_check:TRUE", *args],
                           capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout.splitlines()

    hexmarker = marker.encode().hex()
    tcp = tshark("-Y", "tcp.port == 5011 && esp", "-T", "fields", "-e", "esp.icv_good", "-e", "tcp.payload")
    assert len(tcp) > 100, f"tshark decrypted {len(tcp)} TCP segments"
    assert all(row.split("\t")[0] in ("1", "True") for row in tcp), tcp[:5]
    assert sum(hexmarker in row.replace(":", "") for row in tcp) >= 10, "no marker in the decrypted TCP"
    udp = tshark("-Y", "udp.dstport == 6011 && esp", "-T", "fields", "-e", "ipv6.src", "-e", "data.data")
    assert len(udp) == 30, udp
    assert all(row.startswith(B6 + "\t") for row in udp), udp[:3]
    # Each datagram decrypted byte for byte as nettool.py sent it.
    sent = {nettool.datagram(i, max(nettool.UDP_SIZES[i % len(nettool.UDP_SIZES)], 13), marker.encode()).hex()
            for i in range(30)}
    assert {row.split("\t")[1].replace(":", "") for row in udp} == sent, udp[:3]
    assert sum(hexmarker in row for row in udp) >= 3, udp[:3]
    # Without the file, the same capture shows no TCP or UDP at all.
    (conf / "esp_sa").write_text("")
    assert tshark("-Y", "(tcp.port == 5011 || udp.dstport == 6011) && esp") == []
