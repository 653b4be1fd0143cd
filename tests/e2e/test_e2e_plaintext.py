"""Plaintext from the peer, where the inbound policy requires IPsec, never
reaches B's applications: tunsec's nftables table drops it and counts it.

The plaintext is written onto A's veth directly (AF_PACKET), so A's TUN
device and daemon never see it; later A's daemon is stopped and A's own
kernel sends in the clear.
"""

import json
import re
import secrets
import subprocess
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from e2elib import (
    A4, A6, B4, B6, IFACE_A, IFACE_B, make_topology, mkconf, nft_drop_counters, ping, tcp_snmp, tunsec_bin, write_pcap,
)

V4_RULE = f"ip saddr {A4} ip daddr {B4}"
V6_RULE = f"ip6 saddr {A6} ip6 daddr {B6}"
TCP_PORT, UDP_PORT = 7001, 7002


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "2")
    a_conf, b_conf = mkconf("windows", topo.workdir / "conf")
    topo.da = topo.daemon(topo.a, a_conf).start()
    topo.db = topo.daemon(topo.b, b_conf).start()
    return topo


def start_probe(net, duration: float, max_events: int = 0):
    """B's application: a dual-stack TCP listener and UDP socket that report
    everything that reaches them."""
    p = net.tool(net.b, "probe", "--bind", "::", "--tcp-port", str(TCP_PORT), "--udp-port", str(UDP_PORT),
                 "--duration", str(duration), "--max-events", str(max_events))
    p.wait_ready()
    return p


def hello(net, a: str, b: str, text: str) -> None:
    net.tool(net.a, "tcp-hello", "--to", b, "--port", str(TCP_PORT), "--udp-port", str(UDP_PORT),
             "--data", text).result(30)


def v4mapped(a: str) -> str:
    return a if ":" in a else f"::ffff:{a}"


def refused(net):
    """B's `tunsec stats` figure of refused plaintext (read from its
    table's counters, cached for a second: wait that long first)."""
    time.sleep(1.1)
    r = subprocess.run([str(tunsec_bin()), "stats", "--json", "--control", str(net.db.control)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["plaintext_refused"]


def test_injected_plaintext_is_dropped_and_counted(net, tmp_path):
    marker = "TUNSEC-E2E-PLAINTEXT-" + secrets.token_hex(6)
    mac_a, mac_b = net.mac(net.a, IFACE_A), net.mac(net.b, IFACE_B)
    frames = {"v4": [], "v6": []}
    for fam, l3 in (("v4", lambda: IP(src=A4, dst=B4)), ("v6", lambda: IPv6(src=A6, dst=B6))):
        eth = Ether(src=mac_a, dst=mac_b)
        for i in range(3):
            frames[fam].append(eth / l3() / TCP(sport=41000 + i, dport=TCP_PORT, flags="S", seq=1000 + i))
        frames[fam].append(eth / l3() / TCP(sport=41010, dport=TCP_PORT, flags="PA", seq=5, ack=7) / marker)
        for i in range(2):
            frames[fam].append(eth / l3() / UDP(sport=42000 + i, dport=UDP_PORT) / f"{marker}-{i}")
    pcap = write_pcap(tmp_path / "plain.pcap", [bytes(f) for f in frames["v4"] + frames["v6"]])

    # it stops after the 4 positive controls, or after 20 s
    probe = start_probe(net, duration=20, max_events=4)
    refused0 = refused(net)
    nft0, snmp0, cb0 = nft_drop_counters(net, net.b), tcp_snmp(net, net.b), net.db.counters(settle=0)
    assert set(nft0) == {V4_RULE, V6_RULE}, f"tunsec's drop rules in {net.b}: {nft0}"
    sent = net.tool(net.a, "inject", "--iface", IFACE_A, str(pcap)).result(30)
    assert sent["sent"] == 12
    time.sleep(0.5)
    nft1, snmp1 = nft_drop_counters(net, net.b), tcp_snmp(net, net.b)
    assert nft1[V4_RULE] - nft0[V4_RULE] == len(frames["v4"]), f"{nft0} -> {nft1}"
    assert nft1[V6_RULE] - nft0[V6_RULE] == len(frames["v6"]), f"{nft0} -> {nft1}"
    assert snmp1["InSegs"] == snmp0["InSegs"], "plaintext TCP reached B's TCP stack"
    assert refused(net) - refused0 == 12
    # Positive control: the same sockets do get what comes through tunsec.
    hello(net, A4, B4, "via-tunsec-v4")
    hello(net, A6, B6, "via-tunsec-v6")
    got = probe.result(30)
    assert got["tcp"] == [{"peer": v4mapped(A4), "data": "via-tunsec-v4"}, {"peer": A6, "data": "via-tunsec-v6"}]
    assert got["udp"] == [{"peer": v4mapped(A4), "data": "via-tunsec-v4"}, {"peer": A6, "data": "via-tunsec-v6"}]
    cb1 = net.db.counters()
    assert cb1["dropped"] == cb0["dropped"], f"{cb0.line} -> {cb1.line}"
    assert cb1["in_packets"] > cb0["in_packets"], f"{cb0.line} -> {cb1.line}"


def test_peer_without_daemon_sends_plaintext_that_is_dropped(net):
    """With A's daemon stopped, A's kernel talks to B in the clear: B's
    application sees nothing, B's nftables counters count every datagram."""
    net.da.stop()
    for b in (B4, B6):  # neighbours resolved, so that no datagram waits for ARP/ND
        ping(net, net.a, b, count=1)
    probe = start_probe(net, duration=4)
    nft0 = nft_drop_counters(net, net.b)
    for a, b in ((A4, B4), (A6, B6)):
        r = net.run(net.a, "python3", "-c", (
            "import socket,sys\n"
            f"s=socket.socket(socket.AF_INET{'6' if ':' in b else ''},socket.SOCK_DGRAM)\n"
            f"[s.sendto(b'clear-%d' % i, ('{b}', {UDP_PORT})) for i in range(5)]\n"
            f"t=socket.socket(s.family,socket.SOCK_STREAM); t.settimeout(1.5)\n"
            f"t.connect(('{b}', {TCP_PORT}))\n"), check=False)
        assert r.returncode != 0 and "timed out" in r.stderr, f"TCP connect in the clear to {b}: {r.stderr}"
    time.sleep(0.3)
    nft1 = nft_drop_counters(net, net.b)
    got = probe.result(30)
    assert got == {"tcp": [], "udp": []}, got
    # 5 datagrams and at least one SYN per family
    assert nft1[V4_RULE] - nft0[V4_RULE] >= 6, f"{nft0} -> {nft1}"
    assert nft1[V6_RULE] - nft0[V6_RULE] >= 6, f"{nft0} -> {nft1}"


def test_inbound_policy_changes_are_map_elements(net, tmp_path):
    """A host-to-host inbound policy added, changed or deleted at run time
    is an element of the table's sets of refused or allowed pairs (no
    reload: the table keeps its handle). The sets of a priority come and
    go with its first and last such policy, over netlink with their rules,
    and nft lists them as it lists its own. Any other inbound policy
    rewrites the input chain in one transaction; the sets in place keep
    their elements and the table its handle. A table changed from outside
    is loaded whole again."""
    def setkey(text):
        r = subprocess.run([str(tunsec_bin()), "setkey", "--control", str(net.db.control), "-c"], input=text,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr

    def table():
        return net.run(net.b, "nft", "-a", "list", "table", "inet", "tunsec_tsec0").stdout

    def handle(t):
        return re.search(r"table inet tunsec_tsec0 \{ # handle (\d+)", t).group(1)

    def elements(t):
        return len(re.findall(r" \. \S+ counter packets \d+ bytes \d+", t))

    def in_set(t, name, src, dst):
        """Whether SRC . DST is an element of set NAME in listing T."""
        block = re.search(rf"set {name} \{{.*?\n\t\}}", t, re.S)
        return bool(block) and f"{src} . {dst} counter" in block.group(0)

    t0 = table()
    peer = "10.77.0.99"
    setkey(f"spdadd {peer} {B4} any -P in ipsec esp/transport//require;\n")
    t1 = table()
    assert handle(t1) == handle(t0), "the table was reloaded"
    assert in_set(t1, "in4_2147483648_drop", peer, B4), t1
    # Plaintext from that peer is refused and counted; the count stays
    # when the element that counted it goes (its verdict changes below).
    mac_a, mac_b = net.mac(net.a, IFACE_A), net.mac(net.b, IFACE_B)
    frames = [bytes(Ether(src=mac_a, dst=mac_b) / IP(src=peer, dst=B4) / UDP(sport=43000 + i, dport=UDP_PORT))
              for i in range(3)]
    r0 = refused(net)
    assert net.tool(net.a, "inject", "--iface", IFACE_A,
                    str(write_pcap(tmp_path / "peer.pcap", frames))).result(30)["sent"] == 3
    r1 = refused(net)
    assert r1 - r0 == 3, (r0, r1)
    setkey(f"spdupdate {peer} {B4} any -P in none;\n")
    t2 = table()
    assert handle(t2) == handle(t0) and in_set(t2, "in4_2147483648_pass", peer, B4), t2
    assert not in_set(t2, "in4_2147483648_drop", peer, B4), t2
    assert refused(net) == r1, "a deleted element took its count with it"
    setkey(f"spddelete {peer} {B4} any -P in;\n")
    t3 = table()
    assert handle(t3) == handle(t0) and peer not in t3, t3
    # Not host to host: a rule of its own over netlink, the table kept.
    setkey(f"spdadd {peer} {B4} tcp -P in discard;\n")
    t4 = table()
    assert handle(t4) == handle(t0) and f"ip saddr {peer} ip daddr {B4} meta l4proto tcp" in t4, t4
    assert elements(t4) == elements(t0), "the map elements in place stay"
    assert "rewriting the input chain" not in net.db.log() and "loading the table whole" not in net.db.log()
    # What the rule refused stays counted when it goes (the kernel echoes
    # it with its counter).
    syns = [bytes(Ether(src=mac_a, dst=mac_b) / IP(src=peer, dst=B4) / TCP(sport=44000 + i, dport=TCP_PORT, flags="S"))
            for i in range(2)]
    assert net.tool(net.a, "inject", "--iface", IFACE_A,
                    str(write_pcap(tmp_path / "syn.pcap", syns))).result(30)["sent"] == 2
    r2 = refused(net)
    assert r2 - r1 == 2, (r1, r2)
    setkey(f"spddelete {peer} {B4} tcp -P in;\n")
    assert refused(net) == r2, "the deleted rule took its count with it"
    # A priority no map has yet, in each family: a new map and its rule,
    # over netlink (no nft process), before the maps of the peers' policies
    # (priority 77 comes first).
    peer6 = "fd77::99"
    setkey(f"spdadd {peer} {B4} any -P in priority 77 ipsec esp/transport//require;\n"
           f"spdadd {peer6} {B6} any -P in priority 77 ipsec esp/transport//require;\n")
    t5 = table()
    assert handle(t5) == handle(t0), t5
    assert all(f"set {n} {{" in t5 for n in ("in4_77_drop", "in4_77_pass", "in6_77_drop", "in6_77_pass")), t5
    assert in_set(t5, "in4_77_drop", peer, B4) and in_set(t5, "in6_77_drop", peer6, B6), t5
    assert elements(t5) == elements(t0) + 2, t5
    rules = [ln.strip() for ln in t5.split("chain input {")[1].splitlines() if "comment" in ln]
    at = {m: next(i for i, r in enumerate(rules) if f"@{m} " in r)
          for m in ("in4_77_drop", "in4_77_pass", "in6_77_drop", "in6_77_pass",
                    "in4_2147483648_drop", "in6_2147483648_drop")}
    assert max(at[m] for m in at if "_77_" in m) < min(at["in4_2147483648_drop"], at["in6_2147483648_drop"]), t5
    assert ("ip6 saddr . ip6 daddr @in6_77_drop drop comment "
            "\"IPv6 policies from host to host at priority 77: refused\"") in t5, t5
    assert "rewriting the input chain" not in net.db.log() and "loading the table whole" not in net.db.log()
    # Refused there and counted; then their last elements deleted, the
    # sets and their rules go with them, and the count stays.
    r3 = refused(net)
    assert net.tool(net.a, "inject", "--iface", IFACE_A,
                    str(write_pcap(tmp_path / "peer77.pcap", frames[:2]))).result(30)["sent"] == 2
    r4 = refused(net)
    assert r4 - r3 == 2, (r3, r4)
    setkey(f"spddelete {peer} {B4} any -P in;\nspddelete {peer6} {B6} any -P in;\n")
    assert refused(net) == r4, "the sets that went took their elements' counts with them"
    t6 = table()
    assert handle(t6) == handle(t0) and peer not in t6 and elements(t6) == elements(t0), t6
    assert "_77_" not in t6, t6
    assert "rewriting the input chain" not in net.db.log()
    # What netlink built is what nft builds from text: the maps and their
    # rules made again, the table loaded whole (its input chain deleted
    # from outside first), then the same listing once the policy that
    # made the load goes.
    setkey(f"spdadd {peer} {B4} any -P in priority 77 ipsec esp/transport//require;\n"
           f"spdadd {peer6} {B6} any -P in priority 77 ipsec esp/transport//require;\n")
    # With rules of each shape tunsec writes: addresses whole, a prefix of
    # whole bytes or not, ports, ICMP type and code, either family, each
    # in its place among the others.
    shapes = ("spdadd 10.77.0.0/24[22] 10.77.1.1[80] tcp -P in priority 76 discard;\n"
              "spdadd 10.77.16.0/20 10.77.1.1 icmp 8,0 -P in none;\n"
              "spdadd 10.77.2.2 10.77.1.1 udp -P in priority 78 ipsec esp/transport//require;\n"
              "spdadd fd77::/61 fd77:1::1[500] udp -P in priority 76 discard;\n"
              "spdadd fd77:2::/64 fd77:1::/64 icmp6 135 -P in none;\n")
    setkey(shapes)
    assert "rewriting the input chain" not in net.db.log() and "loading the table whole" not in net.db.log()
    built = table()
    assert all(f"saddr {a} " in built for a in ("10.77.0.0/24", "10.77.16.0/20", "10.77.2.2", "fd77::/61",
                                                 "fd77:2::/64")), built
    net.run(net.b, "nft", "delete", "chain", "inet", "tunsec_tsec0", "input")
    setkey(f"spdadd {peer} {B4} udp -P in discard;\n")
    assert "loading the table whole" in net.db.log()
    setkey(f"spddelete {peer} {B4} udp -P in;\n")
    loaded = table()
    assert handle(loaded) != handle(built)

    def norm(t):
        # The sets and chains by name (a listing gives them in the order
        # they were made), without handles and counts.
        t = re.sub(r" # handle \d+", "", t)
        t = re.sub(r"counter packets \d+ bytes \d+", "counter", t)
        return dict(re.findall(r"^\t((?:set|chain) \S+) \{\n(.*?)^\t\}", t, re.M | re.S))
    assert {"set in4_77_drop", "set in6_77_pass", "chain input"} <= set(norm(built)), built
    assert norm(loaded) == norm(built), f"netlink:\n{built}\nnft:\n{loaded}"
    setkey(f"spddelete {peer} {B4} any -P in;\nspddelete {peer6} {B6} any -P in;\n"
           + re.sub(r" -P in .*;", " -P in;", shapes).replace("spdadd", "spddelete"))
    # Changed from outside again: the next change of maps loads the table
    # whole too, and it is right again.
    net.run(net.b, "nft", "delete", "chain", "inet", "tunsec_tsec0", "input")
    setkey(f"spdadd {peer} {B4} any -P in priority 78 discard;\n")
    t7 = table()
    assert "chain input" in t7 and "@in4_78_drop drop" in t7 and in_set(t7, "in4_78_drop", peer, B4), t7
    assert net.db.log().count("loading the table whole") == 2
    setkey(f"spddelete {peer} {B4} any -P in;\n")
    # The peers' own policies still refuse plaintext.
    assert set(nft_drop_counters(net, net.b)) == {V4_RULE, V6_RULE}


def test_refused_counts_stay_through_a_rewrite_and_a_whole_load(net, tmp_path):
    """A change that turns a priority's host-to-host policies from set
    elements into rules rewrites the input chain as text, deleting the
    elements with their counters; a table changed from outside is loaded
    whole. What the table had refused stays in `tunsec stats` both times."""
    def setkey(text):
        r = subprocess.run([str(tunsec_bin()), "setkey", "--control", str(net.db.control), "-c"], input=text,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr

    def table():
        return net.run(net.b, "nft", "list", "table", "inet", "tunsec_tsec0").stdout

    peer = "10.77.0.98"
    mac_a, mac_b = net.mac(net.a, IFACE_A), net.mac(net.b, IFACE_B)
    frames = [bytes(Ether(src=mac_a, dst=mac_b) / IP(src=peer, dst=B4) / UDP(sport=45000 + i, dport=UDP_PORT))
              for i in range(3)]
    setkey(f"spdadd {peer} {B4} any -P in priority 90 discard;\n")
    assert "@in4_90_drop" in table()
    r0 = refused(net)
    assert net.tool(net.a, "inject", "--iface", IFACE_A,
                    str(write_pcap(tmp_path / "p90.pcap", frames))).result(30)["sent"] == 3
    r1 = refused(net)
    assert r1 - r0 == 3, (r0, r1)
    # A /31 for TCP is as specific as host to host: the priority's
    # policies become rules, the sets and their elements go.
    rewrites = net.db.log().count("rewriting the input chain")
    setkey(f"spdadd 10.77.3.0/31 {B4} tcp -P in priority 90 discard;\n")
    t = table()
    assert "in4_90_drop" not in t and f"ip saddr {peer} ip daddr {B4} counter" in t, t
    assert net.db.log().count("rewriting the input chain") == rewrites, "not a failed batch: the text route"
    assert refused(net) == r1, "the rewrite took the elements' counts with it"
    # Refused by the rule now; then the table is loaded whole.
    assert net.tool(net.a, "inject", "--iface", IFACE_A,
                    str(write_pcap(tmp_path / "p90b.pcap", frames[:2]))).result(30)["sent"] == 2
    r2 = refused(net)
    assert r2 - r1 == 2, (r1, r2)
    loads = net.db.log().count("loading the table whole")
    net.run(net.b, "nft", "delete", "chain", "inet", "tunsec_tsec0", "input")
    setkey(f"spdadd {peer} {B4} udp -P in priority 91 discard;\n")
    assert net.db.log().count("loading the table whole") == loads + 1
    assert refused(net) == r2, "the whole load took the counts with it"
    setkey(f"spddelete {peer} {B4} any -P in;\nspddelete 10.77.3.0/31 {B4} tcp -P in;\n"
           f"spddelete {peer} {B4} udp -P in;\n")
