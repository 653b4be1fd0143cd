"""Case 5: Wireshark's ESP dissector decrypts tunsec's output and checks
the ICV of every packet; tcpdump prints AH+ESP bundles like the seed's
capture.
"""

import re

import pytest

from helpers import (
    MARKER,
    SUITES,
    AH_ESP_LINE,
    expect_summary,
    host_pair,
    ipsec_offset,
    run_tunsec,
    tcpdump_lines,
    traffic_mix,
    tshark_fields,
    write_pcap,
)

FAMILIES = {
    "v4": ("192.0.2.1", "192.0.2.2"),
    "v6": ("2001:db8::1", "2001:db8::2"),
}

TSHARK_SUITES = [
    "esp-aes256cbc-sha256",
    "esp-aes128cbc-sha1",
    "esp-aes128gcm16",
    "esp-aes256gcm16",
    "esp-aes128cbc-sha512",
    "esp-aes128cbc-sha1+ah-sha1",
]

FIELDS = ["ah.spi", "esp.spi", "esp.sequence", "esp.icv_good", "esp.icv_bad", "esp.protocol", "esp.pad_len",
          "data.data", "_ws.expert.message"]


def transport_bytes(pkt) -> bytes:
    """The original upper-layer bytes (what ESP carries)."""
    b = bytes(pkt)
    return b[(b[0] & 0xF) * 4:] if b[0] >> 4 == 4 else b[40:]


def upper_proto(pkt) -> int:
    b = bytes(pkt)
    return b[9] if b[0] >> 4 == 4 else b[6]


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("suite_name", TSHARK_SUITES)
def test_tshark_decrypts_and_verifies_icv(work, tshark, suite_name, fam):
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES[suite_name])
    cfg = hp.write(work / "a.conf")
    plain = traffic_mix(a, b)
    run = run_tunsec(cfg, "out", plain, work)
    expect_summary(run, read=len(plain), written=len(plain))
    esp = hp.out.get("esp")
    ah = hp.out.get("ah")
    rows = tshark_fields(run.out_path, [esp], FIELDS)
    assert len(rows) == len(plain)
    for i, (row, orig) in enumerate(zip(rows, plain)):
        r = dict(zip(FIELDS, row))
        ctx = f"packet {i + 1} ({orig.summary()}): {r}"
        assert r["esp.spi"] == f"0x{esp.spi:08x}", ctx
        assert r["esp.sequence"] == str(i + 1), ctx
        if ah:
            assert r["ah.spi"] == f"0x{ah.spi:08x}", ctx
        assert r["esp.icv_good"] in ("1", "True"), ctx
        assert r["esp.icv_bad"] in ("", "0", "False"), ctx
        assert int(r["esp.protocol"], 0) == upper_proto(orig), ctx
        assert "ICV" not in r["_ws.expert.message"] or "correct" in r["_ws.expert.message"].lower(), ctx
        # the decrypted payload, exactly
        data = bytes.fromhex(r["data.data"])
        assert data == transport_bytes(orig), ctx
        if MARKER in bytes(orig):
            assert MARKER in data
        # pad length as the packet carries it
        assert r["esp.pad_len"] != "", ctx


@pytest.mark.parametrize("fam", FAMILIES)
def test_tshark_detects_a_bad_icv(work, tshark, fam):
    """The check above is not vacuous: tshark flags a corrupted packet."""
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES["esp-aes256cbc-sha256"])
    cfg = hp.write(work / "a.conf")
    plain = traffic_mix(a, b, big=False)[:3]
    run = run_tunsec(cfg, "out", plain, work)
    bad = bytearray(run.packets[1])
    bad[ipsec_offset(bytes(bad), 50) + 30] ^= 0x10
    p = write_pcap(work / "bad.pcap", [run.packets[0], bytes(bad), run.packets[2]])
    rows = tshark_fields(p, [hp.out.get("esp")], ["esp.icv_good", "esp.icv_bad"])
    good = [r[0] in ("1", "True") for r in rows]
    badf = [r[1] in ("1", "True") for r in rows]
    assert good == [True, False, True] and badf == [False, True, False], rows


@pytest.mark.parametrize("fam", FAMILIES)
def test_tcpdump_prints_ah_esp_bundle(work, tcpdump, fam):
    a, b = FAMILIES[fam]
    hp = host_pair(a, b, SUITES["esp-aes128cbc-sha1+ah-sha1"])
    cfg = hp.write(work / "a.conf")
    plain = traffic_mix(a, b)
    run = run_tunsec(cfg, "out", plain, work)
    lines = tcpdump_lines(run.out_path)
    assert len(lines) == len(plain)
    ip = "IP6" if fam == "v6" else "IP"
    for i, (line, got) in enumerate(zip(lines, run.packets)):
        assert re.search(rf" {ip} {re.escape(a)} > {re.escape(b)}: AH\(", line), line
        m = AH_ESP_LINE.search(line)
        assert m, line
        assert int(m["ahspi"], 16) == hp.out.get("ah").spi
        assert int(m["espspi"], 16) == hp.out.get("esp").spi
        assert int(m["ahseq"], 16) == i + 1 and int(m["espseq"], 16) == i + 1, line
        if m["icv"] is not None:
            assert len(m["icv"]) == 2 * 12, line
        assert int(m["len"]) == len(got) - ipsec_offset(got, 50), line
