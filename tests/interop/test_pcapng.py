"""`tunsec pcap` reads pcapng, the format Wireshark and dumpcap write by
default. The files are made by editcap (Wireshark's converter) from pcaps
written by scapy, so the container is not tunsec's own idea of pcapng.

pcapng timestamps count units of the interface's if_tsresol (microseconds
unless it says otherwise). They drive SA lifetimes in pcap mode, so a
misread resolution shows up as a lifetime that never expires.
"""

import subprocess

import pytest
from scapy.layers.l2 import ARP, Ether
from scapy.utils import PcapWriter

from helpers import (
    LINKTYPE_ETHERNET,
    SA,
    SUITES,
    canonical,
    expect_summary,
    host_pair,
    read_pcap,
    run_tunsec,
    scapy_open,
    tcp_packet,
    tunsec_bin,
    udp_packet,
    write_config,
)

A, B = "192.0.2.1", "192.0.2.2"


def to_pcapng(editcap: str, src, dst):
    subprocess.run([editcap, "-F", "pcapng", str(src), str(dst)], check=True, capture_output=True)
    assert dst.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"
    return dst


def tunsec_pcap(cfg, direction, inp, out) -> str:
    """Run `tunsec pcap` on a file as it is; its summary line."""
    proc = subprocess.run([str(tunsec_bin()), "pcap", "--config", str(cfg), "--direction", direction,
                           str(inp), str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_pcapng_gives_what_pcap_gives(work, editcap):
    hp = host_pair(A, B, SUITES["esp-aes128cbc-sha1+ah-sha1"])
    cfg = hp.write(work / "a.conf")
    plain = [udp_packet(A, B, 1, 0), tcp_packet(A, B, 2, 700), udp_packet(A, B, 3, 1200)]
    frames = [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / p for p in plain]
    arp = Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=A, pdst=B)
    ref = run_tunsec(cfg, "out", frames[:1] + [arp] + frames[1:], work, name="ref", linktype=LINKTYPE_ETHERNET)
    expect_summary(ref, read=4, written=3, not_ip=1)
    ng = to_pcapng(editcap, ref.in_path, work / "frames.pcapng")

    out = work / "ng-out.pcap"
    assert tunsec_pcap(cfg, "out", ng, out) == ref.summary.line
    got = read_pcap(out)
    # CBC IVs are random: compare what scapy recovers, not the bytes.
    assert [scapy_open(g, hp.out, seq=i + 1) for i, g in enumerate(got)] == [bytes(p) for p in plain]


@pytest.mark.parametrize("nano", [False, True], ids=["usec", "nsec"])
def test_pcapng_timestamps_drive_lifetimes(work, editcap, nano):
    sa = SA.esp(A, B, 0x4001, "aes-gcm-16", 128)
    cfg = write_config(work / "lt.conf", [sa], [f"spdadd {A} {B} any -P out ipsec esp/transport//require;"])
    text = cfg.read_text().replace(f"esp {sa.spi:#x}", f"esp {sa.spi:#x} -lh 5")
    assert "-lh 5" in text
    cfg.write_text(text)
    # Packets 0 s, 3 s and 6 s after the first: the hard lifetime (5 s)
    # has passed for the third.
    pc = work / "timed.pcap"
    w = PcapWriter(str(pc), linktype=101, nano=nano, sync=True)
    for i, t in enumerate([1_700_000_000.25, 1_700_000_003.25, 1_700_000_006.25]):
        p = canonical(udp_packet(A, B, i, 100))
        p.time = t
        w.write(p)
    w.close()
    ng = to_pcapng(editcap, pc, work / "timed.pcapng")
    if nano:
        # if_tsresol (option 9, length 1) = 9: nanoseconds
        assert b"\x09\x00\x01\x00\x09" in ng.read_bytes()
    assert tunsec_pcap(cfg, "out", ng, work / "timed-out.pcap") == "read 3, written 2, dropped 1 (sa-expired 1)"
