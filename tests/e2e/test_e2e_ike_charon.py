"""strongSwan keys tunsec (issue 8): two unmodified charons (Debian's
strongswan-charon, IKEv2, PSK) in two namespaces, each keying its own
`tunsec run --xfrm` through `tunsec ike`. Transport-mode children with
ESP aes-gcm-16, ESP aes-cbc + hmac-sha256 with IPComp, AH, and ESN; a
trap child brought up by tunsec's ACQUIRE; rekeys by swanctl and by
tunsec's soft EXPIRE during transfers; terminate; SIGKILL.

A second connection with `encap = yes` keys a child with UDP encapsulation
(ESP in UDP). Each child has its own traffic (a TCP or UDP port), so their policies do
not overlap.
"""

import json
import re
import signal
import subprocess
import time

import pytest

from charon import Charon, available
from e2elib import A4, B4, IFACE_A, Capture, ip_packets, make_topology, tcp_transfer_check, tcp_transfer_start, \
    tunsec_bin

pytestmark = pytest.mark.skipif(not available(), reason="strongswan-charon and strongswan-swanctl are not installed")

CHILDREN = {
    # name: (remote port spec, child options)
    "gcm": ("tcp/5001", "esp_proposals = aes128gcm16"),
    "cbcip": ("tcp/5002", "esp_proposals = aes128-sha256\n ipcomp = yes"),
    "ah": ("tcp/5003", "ah_proposals = sha256"),
    "esn": ("tcp/5004", "esp_proposals = aes128gcm16-esn"),
    "short": ("tcp/5006", "esp_proposals = aes128gcm16\n rekey_time = 4s\n life_time = 30s\n rand_time = 0s"),
    # Everything between the two hosts: IKE itself matches it, and must
    # still leave in the clear.
    "all": ("", "esp_proposals = aes128gcm16"),
}


# A second IKE SA from A with `encap = yes`: charon fakes NAT detection,
# both sides move to port 4500 and key their child with UDP encapsulation
# (XFRMA_ENCAP): ESP in UDP, RFC 3948.
NAT_CONN = f"""nat {{ version = 2
  local_addrs = {A4}
  remote_addrs = {B4}
  encap = yes
  proposals = aes128-sha256-modp2048
  local {{ auth = psk
          id = {A4} }}
  remote {{ auth = psk
           id = {B4} }}
  children {{ udp {{ local_ts = {A4}/32[tcp]
                   remote_ts = {B4}/32[tcp/5007]
                   mode = transport
                   esp_proposals = aes128gcm16
                   start_action = none }} }} }}"""
UDP_CHILD_B = f"""
   udp {{ local_ts = {B4}/32[tcp/5007]
     remote_ts = {A4}/32[tcp]
     mode = transport
     esp_proposals = aes128gcm16 }}"""


def children(local: str, remote: str, trap: bool) -> str:
    out = []
    for name, (port, opts) in CHILDREN.items():
        proto = port.split("/")[0]
        # A connects to B's port: on B the port is local.
        lp, rp = (f"[{proto}]", f"[{port}]") if port else ("", "")
        if not trap:
            lp, rp = rp, lp
        out.append(f"""   {name} {{ local_ts = {local}/32{lp}
     remote_ts = {remote}/32{rp}
     mode = transport
     {opts}
     start_action = none }}""")
    # The trap child: on A only (ACQUIRE brings it up), UDP port 5005.
    if trap:
        out.append(f"""   trap {{ local_ts = {local}/32[udp]
     remote_ts = {remote}/32[udp/5005]
     mode = transport
     esp_proposals = aes128gcm16
     start_action = trap }}""")
    else:
        out.append(f"""   trap {{ local_ts = {local}/32[udp/5005]
     remote_ts = {remote}/32[udp]
     mode = transport
     esp_proposals = aes128gcm16 }}""")
    return "\n".join(out)


def setkey_dump(daemon, *flags) -> str:
    r = subprocess.run([str(tunsec_bin()), "setkey", "--control", str(daemon.control), *flags], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def spis(dump: str) -> set[str]:
    return {f"{int(m, 16):08x}" for m in re.findall(r"spi=\d+\((0x[0-9a-f]+)\)", dump)}


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "C")
    topo.da = topo.daemon(topo.a, None, xfrm=True).start()
    topo.db = topo.daemon(topo.b, None, xfrm=True).start()
    topo.ca = Charon(topo, topo.a, topo.da.xfrm, A4, B4, children(A4, B4, True), "a", extra=NAT_CONN)
    topo.cb = Charon(topo, topo.b, topo.db.xfrm, B4, A4, children(B4, A4, False) + UDP_CHILD_B, "b")
    topo.ca.load()
    topo.cb.load()
    # What tunsec holds before any CHILD_SA: A's trap policies only.
    topo.spd_a0 = setkey_dump(topo.da, "-DP")
    topo.spd_b0 = setkey_dump(topo.db, "-DP")
    yield topo


def test_gcm_child_installs_in_tunsec_and_carries_50mb(net):
    net.ca.initiate("gcm")
    c = net.ca.installed("gcm")
    assert c["mode"] == "TRANSPORT" and "AES_GCM_16" in c["proto"], c
    # The SPIs charon negotiated are tunsec's, on both hosts.
    for d in (net.da, net.db):
        assert {c["in"], c["out"]} <= spis(setkey_dump(d, "-D")), (c, setkey_dump(d, "-D"))
    # The kernel's own SAD and SPD stay empty (charon's per-socket IKE
    # bypasses are the kernel's, not policies).
    for ns in (net.a, net.b):
        assert net.run(ns, "ip", "xfrm", "state").stdout.strip() == ""
        assert "dir" not in net.run(ns, "ip", "xfrm", "policy").stdout
    cap = Capture(net, net.a, IFACE_A, net.workdir / "gcm.pcap")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5001, nbytes=50_000_000)
    tcp_transfer_check(tx, rx, 50_000_000)
    cap.stop()
    pkts = ip_packets(net.workdir / "gcm.pcap")
    esp_out = [p for p in pkts if p.proto == 50 and p.src == A4]
    assert esp_out, "no ESP from A on the wire:\n" + setkey_dump(net.da, "-DP")
    assert {p.payload[:4].hex() for p in esp_out} == {c["out"]}
    assert not [p for p in pkts if p.proto == 6 and (p.payload[2:4] == (5001).to_bytes(2, "big")
                                                       or p.payload[:2] == (5001).to_bytes(2, "big"))], \
        "TCP to port 5001 in the clear"


def test_udp_encapsulated_child_carries_esp_in_udp(net):
    """charon's `encap = yes`: tunsec gets XFRMA_ENCAP, sends ESP in UDP
    from port 4500 (as GSO super-packets) and takes it in on B."""
    net.ca.initiate("udp")
    c = net.ca.installed("udp")
    assert c["mode"] == "TRANSPORT-in-UDP", c
    for d in (net.da, net.db):
        dump = setkey_dump(d, "-D")
        assert {c["in"], c["out"]} <= spis(dump), (c, dump)
        assert f"{A4}[4500] {B4}[4500]\n\tesp-udp mode=transport" in dump, dump
    cap = Capture(net, net.a, IFACE_A, net.workdir / "udp.pcap")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5007, nbytes=20_000_000)
    tcp_transfer_check(tx, rx, 20_000_000)
    cap.stop()
    pkts = ip_packets(net.workdir / "udp.pcap")
    udp_out = [p for p in pkts if p.proto == 17 and p.src == A4 and p.payload[:4] == bytes.fromhex("11941194")]
    # ESP in UDP: the SPI follows the UDP header.
    assert {p.payload[8:12].hex() for p in udp_out} == {c["out"]}, len(udp_out)
    assert not [p for p in pkts if p.proto == 50], "bare ESP on the wire"
    assert not [p for p in pkts if p.proto == 6 and p.payload[2:4] == (5007).to_bytes(2, "big")], \
        "TCP to port 5007 in the clear"


@pytest.mark.parametrize("child,port,proto,expect", [
    ("cbcip", 5002, "ESP:AES_CBC-128/HMAC_SHA2_256_128", "IPCOMP"),
    ("ah", 5003, "AH:HMAC_SHA2_256_128", "AH"),
    ("esn", 5004, "ESP:AES_GCM_16-128/ESN", "ESP"),
])
def test_cbc_ipcomp_ah_and_esn_children(net, child, port, proto, expect):
    net.ca.initiate(child)
    c = net.ca.installed(child)
    assert c["proto"].startswith(proto), c
    dump = setkey_dump(net.da, "-D")
    assert {c["in"], c["out"]} <= spis(dump), (c, dump)
    if expect == "IPCOMP":
        # swanctl shows the CPIs beside the SPIs; tunsec holds the IPComp SAs.
        assert c.get("in_cpi") and c.get("out_cpi"), net.ca.swanctl("--list-sas")
        assert f"({int(c['out_cpi'], 16):#010x})" in dump and "ipcomp mode=transport" in dump, (c, dump)
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, port, nbytes=5_000_000, text=True)
    tcp_transfer_check(tx, rx, 5_000_000)
    stats = subprocess.run([str(tunsec_bin()), "stats", "--control", str(net.da.control), "--json"],
                           capture_output=True, text=True, timeout=30).stdout
    if expect == "IPCOMP":
        # Text compresses: the IPComp SA carried it, and ESP carried less.
        sas = [sa for sa in json.loads(stats)["sas"] if sa["src"] == A4 and sa["reqid"] == c["reqid"]]
        comp = next(sa for sa in sas if sa["proto"] == "ipcomp")
        esp = next(sa for sa in sas if sa["proto"] == "esp")
        assert comp["packets"] > 0 and esp["bytes"] < comp["bytes"] / 2, sas


def test_swanctl_rekey_during_a_transfer_loses_nothing(net):
    old = net.ca.installed("gcm")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5001, duration=3, rate=20_000_000)
    time.sleep(1)
    net.ca.swanctl("--rekey", "--child", "gcm")
    tcp_transfer_check(tx, rx, None)
    new = net.ca.installed("gcm")
    assert new["out"] != old["out"] and new["in"] != old["in"], (old, new)
    assert new["out"] in spis(setkey_dump(net.da, "-D"))


def test_soft_expire_from_tunsec_makes_charon_rekey(net):
    net.ca.initiate("short")
    first = net.ca.installed("short")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5006, duration=8, rate=5_000_000)
    tcp_transfer_check(tx, rx, None)
    # charon rekeys a CHILD_SA only on the data plane's soft EXPIRE.
    log = net.ca.logtext() + net.cb.logtext()
    assert re.search(r"received a XFRM_MSG_EXPIRE", log), log[-3000:]
    assert "creating rekey job for CHILD_SA" in log, log[-3000:]
    now = net.ca.installed("short")
    assert now["out"] != first["out"], (first, now)
    # The timings: installed, soft EXPIRE from tunsec, rekeyed.
    for c in (net.ca, net.cb):
        up = c.events(r"CHILD_SA short\{\d+\} established")
        exp = c.events(r"creating rekey job for CHILD_SA")
        if up and exp:
            later = [t for t, _ in up if t > exp[0][0]]
            print(f"charon {c.name}: soft EXPIRE {exp[0][0] - up[0][0]:.3f} s after install (rekey_time 4 s)"
                  + (f", new CHILD_SA {1000 * (later[0] - exp[0][0]):.0f} ms later" if later else ""))


def test_trap_child_comes_up_on_the_first_packet(net):
    assert "trap" not in net.ca.children()
    send = net.tool(net.a, "udp-send", "--to", B4, "--port", "5005", "--count", "40", "--interval", "0.1")
    end = time.monotonic() + 10
    while "trap" not in net.ca.children() or not any(c["state"] == "INSTALLED"
                                                      for c in net.ca.children()["trap"]):
        assert time.monotonic() < end, f"no CHILD_SA from ACQUIRE:\n{net.ca.logtext()[-3000:]}"
        time.sleep(0.2)
    send.result(30)
    c = net.ca.installed("trap")
    assert c["out"] in spis(setkey_dump(net.da, "-D"))
    assert "received a XFRM_MSG_ACQUIRE" in net.ca.logtext()


def test_ike_itself_bypasses_a_child_that_covers_all_traffic(net):
    net.ca.initiate("all")
    c = net.ca.installed("all")
    cap = Capture(net, net.a, IFACE_A, net.workdir / "all.pcap")
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5301, nbytes=2_000_000)
    tcp_transfer_check(tx, rx, 2_000_000)
    # IKE (UDP 500/4500) matches the child's selectors but goes out, and
    # comes in, in the clear: an IKE rekey completes.
    out = net.ca.swanctl("--rekey", "--ike", "host")
    assert "rekey completed successfully" in out, out
    cap.stop()
    pkts = ip_packets(net.workdir / "all.pcap")
    assert c["out"] in {p.payload[:4].hex() for p in pkts if p.proto == 50 and p.src == A4}
    ike = [p for p in pkts if p.proto == 17 and p.payload[2:4] in (b"\x01\xf4", b"\x11\x94")]
    assert {p.src for p in ike} == {A4, B4}, "IKE both ways in the clear"


def test_terminate_leaves_tunsec_as_before(net):
    net.ca.swanctl("--terminate", "--ike", "host", "--timeout", "20")
    net.ca.swanctl("--terminate", "--ike", "nat", "--timeout", "20", check=False)
    end = time.monotonic() + 10
    same = lambda d, before: sorted(setkey_dump(d, "-DP").splitlines()) == sorted(before.splitlines())
    while (spis(setkey_dump(net.da, "-D")) or spis(setkey_dump(net.db, "-D"))
           or not same(net.da, net.spd_a0) or not same(net.db, net.spd_b0)):
        assert time.monotonic() < end, "\n".join(["SAD A:", setkey_dump(net.da, "-D"), "SPD A:", setkey_dump(net.da, "-DP"),
                                                  "SPD A before:", net.spd_a0, "SPD B:", setkey_dump(net.db, "-DP"),
                                                  "SPD B before:", net.spd_b0])
        time.sleep(0.2)


def test_sigkill_of_charon_leaves_tunsec_running_and_answering(net):
    net.ca.initiate("gcm")
    net.ca.proc.signal(signal.SIGKILL)
    time.sleep(0.5)
    assert net.da.alive()
    assert spis(setkey_dump(net.da, "-D")), "the SAs charon installed are still there"
    r = net.run(net.a, str(tunsec_bin()), "ike", "--xfrm", str(net.da.xfrm), "--", "ip", "xfrm", "state", "list")
    assert "proto esp" in r.stdout, r.stdout
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5001, nbytes=1_000_000)
    tcp_transfer_check(tx, rx, 1_000_000)
