"""Case 7: the seed's two setkey policy files, verbatim, with SAs appended
(ESP aes-cbc + HMAC and AH HMAC, as its racoon negotiates) in a separate
generated file concatenated after them.

Linux (172.17.207.12, 2001:470:1f09:11ed::c) talks to Windows
(172.17.207.66, ::42) and to another Linux host (172.17.207.1). ICMP and
ICMPv6 are exempt; everything else is ESP inside AH.
"""

import re
import subprocess

import pytest
from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6

from helpers import (
    SEED_DIR,
    SEED_DOC,
    SA,
    AH_ESP_LINE,
    Bundle,
    canonical,
    expect_summary,
    header_chain,
    icmp_echo,
    run_tunsec,
    scapy_open,
    scapy_seal,
    setkey_text,
    tcp_packet,
    tcpdump_lines,
    tunsec_bin,
    udp_packet,
)

LINUX4, WIN4, SFERE4 = "172.17.207.12", "172.17.207.66", "172.17.207.1"
LINUX6, WIN6 = "2001:470:1f09:11ed::c", "2001:470:1f09:11ed::42"

# SPIs from the seed's tcpdump lines (IPv6) and made-up ones (IPv4).
SPIS = {
    (LINUX6, WIN6): (0xADB71052, 0x303BFCDC),  # (esp, ah)
    (WIN6, LINUX6): (0x0EFBEBC2, 0x0779C4D7),
    (LINUX4, WIN4): (0xC2A81B01, 0xC2A81B02),
    (WIN4, LINUX4): (0xC2A81B03, 0xC2A81B04),
    (LINUX4, SFERE4): (0xD1000001, 0xD1000002),
    (SFERE4, LINUX4): (0xD1000003, 0xD1000004),
}


def seed_bundle(src, dst, auth):
    esp_spi, ah_spi = SPIS[(src, dst)]
    return Bundle(
        src,
        dst,
        [SA.esp(src, dst, esp_spi, "aes-cbc", 128, auth), SA.ah(src, dst, ah_spi, auth)],
    )


def test_seed_files_are_verbatim():
    seed = SEED_DIR / "seed-linux-windows.conf"
    text = seed.read_text()
    assert text.startswith("#!/usr/sbin/setkey -f\nflush;\nspdflush;\n\n# Don't require encryption for ICMP\n")
    assert "spdadd 2001:470:1f09:11ed::42 2001:470:1f09:11ed::c any -P in ipsec" in text
    assert "\n   \n" in text  # the seed's whitespace-only line, kept
    text2 = (SEED_DIR / "seed-linux-linux.conf").read_text()
    if SEED_DOC.exists():
        doc = SEED_DOC.read_text()
        assert text in doc and text2.rstrip("\n") in doc, "netns/seed-*.conf must be the seed's files verbatim"
    assert text2.startswith("#!/usr/sbin/setkey -f\n")
    assert text2.rstrip().endswith(
        "spdadd 172.17.207.1 172.17.207.12 any -P in ipsec esp/transport//require ah/transport//require;")


def host_config(work, seed_name, bundles):
    """The seed verbatim, then a generated SA file, concatenated."""
    sas = work / "sas.conf"
    sas.write_text("# generated: SAs as racoon would have installed them\n"
                   + setkey_text([sa for b in bundles for sa in b.sas], [], header=""))
    seed = (SEED_DIR / seed_name).read_text()
    cfg = work / "host.conf"
    cfg.write_text(seed + ("" if seed.endswith("\n") else "\n") + sas.read_text())
    check = subprocess.run([str(tunsec_bin()), "check", str(cfg)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    for b in bundles:
        for sa in b.sas:
            assert f"{sa.spi:#010x}" in check.stdout, (sa, check.stdout)
    return cfg


def ns6(src):
    """A neighbor solicitation (must stay in the clear)."""
    return canonical(
        IPv6(src=src, dst="ff02::1:ff00:42", hlim=255)
        / ICMPv6ND_NS(tgt=WIN6)
        / ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:0c")
    )


def test_linux_windows_out(work, tcpdump):
    out4 = seed_bundle(LINUX4, WIN4, "hmac-sha1")
    out6 = seed_bundle(LINUX6, WIN6, "hmac-sha1")
    in4 = seed_bundle(WIN4, LINUX4, "hmac-sha1")
    in6 = seed_bundle(WIN6, LINUX6, "hmac-sha1")
    cfg = host_config(work, "seed-linux-windows.conf", [out4, in4, out6, in6])

    traffic = [
        ("clear", icmp_echo(LINUX4, WIN4, 1)),
        ("v4", tcp_packet(LINUX4, WIN4, 1, 100, sport=50000, dport=22)),
        ("clear", icmp_echo(LINUX6, WIN6, 2)),
        ("v6", tcp_packet(LINUX6, WIN6, 2, 64, sport=50000, dport=445)),
        ("v4", udp_packet(LINUX4, WIN4, 3, 300, dport=53)),
        ("clear", ns6(LINUX6)),
        ("v6", udp_packet(LINUX6, WIN6, 4, 1200, dport=137)),
        ("clear", tcp_packet(LINUX4, "172.17.207.99", 5, 80)),  # no policy for this peer
        ("v4", tcp_packet(LINUX4, WIN4, 6, 1400, sport=50000, dport=3389)),
        ("v6", tcp_packet(LINUX6, WIN6, 7, 0, sport=50000, dport=80)),
    ]
    run = run_tunsec(cfg, "out", [p for _, p in traffic], work)
    expect_summary(run, read=len(traffic), written=len(traffic))
    seq = {"v4": 0, "v6": 0}
    lines = tcpdump_lines(run.out_path)
    assert len(lines) == len(traffic)
    for (kind, orig), got, line in zip(traffic, run.packets, lines):
        if kind == "clear":
            assert got == bytes(orig), orig.summary()
            assert "AH(" not in line and "ESP(" not in line, line
            continue
        seq[kind] += 1
        bundle = out4 if kind == "v4" else out6
        assert header_chain(got) == [("IPv4" if kind == "v4" else "IPv6"), "AH", "ESP"]
        assert scapy_open(got, bundle, seq=seq[kind]) == bytes(orig), orig.summary()
        # like the seed's "IP6 ...::c > ...::42: AH(spi=0x303bfcdc,seq=0x29e6): ESP(spi=0xadb71052,seq=0x29e6), length 116"
        ip = "IP6" if kind == "v6" else "IP"
        src, dst = (LINUX4, WIN4) if kind == "v4" else (LINUX6, WIN6)
        assert re.search(rf" {ip} {re.escape(src)} > {re.escape(dst)}: AH\(spi=0x", line), line
        m = AH_ESP_LINE.search(line)
        assert m, line
        assert int(m["ahspi"], 16) == bundle.get("ah").spi and int(m["espspi"], 16) == bundle.get("esp").spi, line
        assert m["ahseq"] == m["espseq"] == f"{seq[kind]:x}", line
    assert seq == {"v4": 3, "v6": 3}
    assert any(
        re.search(r"IP6 2001:470:1f09:11ed::c > 2001:470:1f09:11ed::42: AH\(spi=0x303bfcdc,seq=0x1[,)].*"
                  r"ESP\(spi=0xadb71052,seq=0x1\), length \d+", ln) for ln in lines), lines


def test_linux_windows_in(work):
    out4 = seed_bundle(LINUX4, WIN4, "hmac-sha1")
    out6 = seed_bundle(LINUX6, WIN6, "hmac-sha1")
    in4 = seed_bundle(WIN4, LINUX4, "hmac-sha1")
    in6 = seed_bundle(WIN6, LINUX6, "hmac-sha1")
    cfg = host_config(work, "seed-linux-windows.conf", [out4, in4, out6, in6])
    plain = [
        tcp_packet(WIN4, LINUX4, 1, 100, sport=445, dport=50000),
        tcp_packet(WIN6, LINUX6, 2, 700, sport=445, dport=50000),
        udp_packet(WIN4, LINUX4, 3, 0, sport=53, dport=40000),
        udp_packet(WIN6, LINUX6, 4, 1300, sport=137, dport=137),
        tcp_packet(WIN4, LINUX4, 5, 1400, sport=3389, dport=50000),
    ]
    seqs = {4: 0, 6: 0}
    sealed = []
    for p in plain:
        v = 6 if ":" in p.src else 4
        seqs[v] += 1
        sealed.append(scapy_seal(p, in4 if v == 4 else in6, seq=seqs[v]))
    # Windows' ICMP goes in the clear (accepted); plaintext TCP is refused.
    clear_icmp = [icmp_echo(WIN4, LINUX4, 9), icmp_echo(WIN6, LINUX6, 9)]
    clear_tcp = [tcp_packet(WIN4, LINUX4, 10, 20), tcp_packet(WIN6, LINUX6, 11, 20)]
    run = run_tunsec(cfg, "in", sealed + clear_icmp + clear_tcp, work)
    expect_summary(run, read=9, written=7, plaintext_refused=2)
    assert run.packets == [bytes(p) for p in plain + clear_icmp]


def test_linux_linux(work, tcpdump):
    """The second seed file: 172.17.207.12 <-> .1, racoon's hmac_sha256.
    It has no IPv6 policies, so IPv6 traffic to the Windows host passes."""
    out = seed_bundle(LINUX4, SFERE4, "hmac-sha256")
    inb = seed_bundle(SFERE4, LINUX4, "hmac-sha256")
    cfg = host_config(work, "seed-linux-linux.conf", [out, inb])
    plain = [
        tcp_packet(LINUX4, SFERE4, 1, 500, dport=22),
        icmp_echo(LINUX4, SFERE4, 2),
        udp_packet(LINUX4, SFERE4, 3, 40, dport=123),
        tcp_packet(LINUX6, WIN6, 4, 100),  # no policy in this file
        tcp_packet(LINUX4, WIN4, 5, 100),  # nor for the Windows host
    ]
    run = run_tunsec(cfg, "out", plain, work)
    expect_summary(run, read=5, written=5)
    assert scapy_open(run.packets[0], out, seq=1) == bytes(plain[0])
    assert run.packets[1] == bytes(plain[1])
    assert scapy_open(run.packets[2], out, seq=2) == bytes(plain[2])
    assert run.packets[3:] == [bytes(p) for p in plain[3:]]
    lines = tcpdump_lines(run.out_path)
    m = AH_ESP_LINE.search(lines[0])
    assert m and int(m["ahspi"], 16) == 0xD1000002 and int(m["espspi"], 16) == 0xD1000001, lines[0]
    if m["icv"] is not None:
        assert len(m["icv"]) == 32  # HMAC-SHA-256-128

    back = [tcp_packet(SFERE4, LINUX4, 1, 900, sport=22, dport=50000), udp_packet(SFERE4, LINUX4, 2, 10)]
    sealed = [scapy_seal(p, inb, seq=i + 1) for i, p in enumerate(back)]
    run = run_tunsec(cfg, "in", sealed + [tcp_packet(SFERE4, LINUX4, 3, 10)], work)
    expect_summary(run, read=3, written=2, plaintext_refused=1)
    assert run.packets == [bytes(p) for p in back]


@pytest.mark.parametrize("seed_name", ["seed-linux-windows.conf", "seed-linux-linux.conf"])
def test_seed_policies_alone_parse(tunsec, seed_name):
    """The seed files on their own (policies, no SAs) are valid setkey."""
    proc = subprocess.run([str(tunsec_bin()), "check", str(SEED_DIR / seed_name)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    n = (SEED_DIR / seed_name).read_text().count("spdadd")
    assert f"{n} policies" in proc.stdout, proc.stdout
