"""Keys at run time (issue 4): both daemons start with policies and no SAs;
scripts/keyd.py answers ACQUIRE through the control sockets and rekeys on
soft EXPIRE. A continuous TCP transfer survives ten make-before-break
rekeys byte for byte. Also: the control socket's own behaviour (atomic
batches, getspi, refusing strangers and hostile clients), `tunsec setkey`
and `tunsec stats`.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from e2elib import (
    A4, B4, DROP_REASONS, REPO_ROOT, make_topology, mkconf, parse_sas, ping, tcp_transfer_check, tcp_transfer_start,
    tunsec_bin,
)

KEYD = REPO_ROOT / "scripts" / "keyd.py"


def policies_only(conf, out):
    out.write_text("".join(l for l in conf.read_text().splitlines(True) if not l.startswith("add ")))
    return out


def ctl(path, msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(path))
    s.send(msg.encode())
    r = json.loads(s.recv(1 << 24))
    s.close()
    return r


def setkey(control, *args, stdin=None):
    return subprocess.run([str(tunsec_bin()), "setkey", "--control", str(control), *args], input=stdin,
                          capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "K")
    a_conf, b_conf = mkconf("gcm", topo.workdir / "conf")
    topo.keys = [l.split()[-1].rstrip(";") for l in a_conf.read_text().splitlines() if l.startswith("add ")]
    a_pol = policies_only(a_conf, topo.workdir / "a-pol.conf")
    b_pol = policies_only(b_conf, topo.workdir / "b-pol.conf")
    topo.da = topo.daemon(topo.a, a_pol).start()
    topo.db = topo.daemon(topo.b, b_pol).start()
    yield topo


def test_transfer_survives_ten_rekeys(net):
    log = open(net.workdir / "keyd.log", "w")
    keyd = subprocess.Popen([sys.executable, str(KEYD), "--a", str(net.da.control), "--b", str(net.db.control),
                             "--soft", "2", "--hard", "8", "--grace", "1.5"], stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        # ~25 s of continuous TCP at a bounded rate: the first SYN raises the
        # ACQUIRE, then the pair is rekeyed every 2 s.
        tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5301, duration=24, rate=4_000_000, timeout=90)
        r = tcp_transfer_check(tx, rx, None, timeout=90)
        assert r["sent"]["bytes"] > 50_000_000, r
    finally:
        keyd.terminate()
        keyd.wait(10)
        log.close()
    text = (net.workdir / "keyd.log").read_text()
    assert "ACQUIRE A 10.77.0.1 10.77.0.2 esp" in text, text
    rekeys = text.count("REKEY ")
    assert rekeys >= 10, f"only {rekeys} rekeys:\n{text}"
    assert "ERROR" not in text, text
    # Nothing was lost to the rekeys on either side.
    for d in (net.da, net.db):
        c = d.counters()
        for reason in ("no-sa", "unknown-spi", "icv-failure", "replay", "replay-old", "sa-expired"):
            assert c[reason] == 0, f"{d.ns}: {reason} {c[reason]}: {c.line}"
    # Key material never reaches the logs.
    for d in (net.da, net.db):
        assert not re.search(r"0x[0-9a-f]{40}", d.log()), "a key-sized hex string is in the log"


def test_getspi_update_and_atomic_batches(net):
    c = net.da.control
    r = ctl(c, "getspi 10.77.0.2 10.77.0.1 esp 0x5000-0x50ff;")
    assert r["ok"], r
    spi = r["spis"][0]
    assert 0x5000 <= spi <= 0x50ff
    d = ctl(c, "dump;")
    assert any(l["spi"] == spi and l["state"] == "larval" for l in d["larval"]), d
    key = "0x" + "ab" * 20
    # add is refused for a reserved SPI; a batch with a bad line changes nothing
    r = ctl(c, f"add 10.77.0.2 10.77.0.1 esp {spi:#x} -E aes-gcm-16 {key};")
    assert not r["ok"] and "reserved by getspi" in r["error"], r
    batch = (f"update 10.77.0.2 10.77.0.1 esp {spi:#x} -E aes-gcm-16 {key};\n"
             f"add 10.77.0.1 10.77.0.2 esp 0x6000 -E aes-gcm-16 0x{'cd' * 19};\n")
    r = ctl(c, batch)
    assert not r["ok"] and r["error"].startswith("control:2: aes-gcm-16 needs a key of 160 or 288 bits"), r
    d = ctl(c, "dump;")
    assert not any(s["spi"] in (spi, 0x6000) for s in d["sas"]), d
    r = ctl(c, batch.replace("cd" * 19, "cd" * 20))
    assert r["ok"], r
    d = ctl(c, "dump -k;")
    got = {s["spi"]: s for s in d["sas"]}
    assert got[spi]["enc_key"] == key and got[0x6000]["state"] == "mature"
    assert "enc_key" not in ctl(c, "dump;")["sas"][0]
    r = ctl(c, f"delete 10.77.0.2 10.77.0.1 esp {spi:#x};\ndelete 10.77.0.1 10.77.0.2 esp 0x6000;")
    assert r["ok"], r


def test_setkey_client_like_setkey8(net, tmp_path):
    c = net.db.control
    f = tmp_path / "bad.conf"
    f.write_text("# a comment\nadd 10.77.0.1 10.77.0.2 esp 0x7000 -E aes-cbc 0x00 -A hmac-sha1 0x00;\n")
    r = setkey(c, "-f", str(f))
    assert r.returncode != 0 and f"{f}:2: aes-cbc needs a key of 128 or 192 or 256 bits" in r.stderr, r
    r = setkey(c, "-c", stdin=f"add 10.77.0.1 10.77.0.2 esp 0x7000 -E aes-gcm-16 0x{'11' * 20};\n")
    assert r.returncode == 0, r.stderr
    r = setkey(c, "-D")
    assert "spi=28672(0x00007000)" in r.stdout and "11" * 20 not in r.stdout, r.stdout
    assert "11" * 20 in setkey(c, "-D", "-k").stdout
    r = setkey(c, "-DP")
    assert "ipsec esp/transport//require" in r.stdout, r.stdout
    r = setkey(c, "-c", stdin="delete 10.77.0.1 10.77.0.2 esp 0x7000;")
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(tunsec_bin()), "stats", "--json", "--control", str(c)], capture_output=True, text=True, timeout=30)
    st = json.loads(r.stdout)
    assert st["ok"] and "drops" in st["counters"] and "plaintext-refused" in st["counters"]["drops"], st
    r = subprocess.run([str(tunsec_bin()), "stats", "--control", str(c)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "dropped:" in r.stdout, r


PROM_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def prometheus(control) -> dict:
    """`tunsec stats --prometheus`: {(name, frozenset(labels)): value};
    every sample line must parse and follow its family's TYPE line."""
    r = subprocess.run([str(tunsec_bin()), "stats", "--prometheus", "--control", str(control)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out, typed = {}, set()
    for line in r.stdout.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = PROM_SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        assert m.group(1) in typed, f"sample before its TYPE: {line!r}"
        labels = frozenset(PROM_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_stats_prometheus_after_traffic(net):
    """`tunsec stats --prometheus` on the running daemons: after a TCP
    transfer, the packet counters and the SA's own counter are non-zero,
    and every drop reason of the engine has its series."""
    conf = net.workdir / "conf"
    adds = {side: [l for l in (conf / f"{side}.conf").read_text().splitlines(True) if l.startswith("add ")]
            for side in "ab"}
    for d, side in ((net.da, "a"), (net.db, "b")):
        r = setkey(d.control, "-c", stdin="".join(adds[side]))
        assert r.returncode == 0, r.stderr
    try:
        before = prometheus(net.da.control)
        tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5311, 2_000_000)
        tcp_transfer_check(tx, rx, 2_000_000)
        time.sleep(1.0)  # workers publish their counters twice a second
        after = prometheus(net.da.control)
        for direction in ("out", "in"):
            key = ("tunsec_packets_total", frozenset({("direction", direction)}))
            assert after[key] > before.get(key, 0), (direction, after[key])
            bkey = ("tunsec_bytes_total", frozenset({("direction", direction)}))
            assert after[bkey] > 0
        sa = next(s for s in parse_sas(conf / "a.conf") if (s.src, s.dst) == (A4, B4))
        sa_key = ("tunsec_sa_packets_total", frozenset({("spi", f"0x{sa.spi:08x}"), ("proto", "esp"),
                                                        ("src", A4), ("dst", B4)}))
        # ~1400 full-size segments carry 2 MB
        assert after.get(sa_key, 0) >= 1000, {k: v for k, v in after.items() if k[0] == "tunsec_sa_packets_total"}
        reasons = {dict(k[1])["reason"] for k in after if k[0] == "tunsec_drops_total"}
        assert reasons == DROP_REASONS, reasons ^ DROP_REASONS
        assert after[("tunsec_uptime_seconds", frozenset())] > 0
    finally:
        for d, side in ((net.da, "a"), (net.db, "b")):
            dels = "".join(f"delete {l.split()[1]} {l.split()[2]} {l.split()[3]} {l.split()[4]};\n" for l in adds[side])
            r = setkey(d.control, "-c", stdin=dels)
            assert r.returncode == 0, r.stderr


def test_monitor_prints_acquire_once(net):
    # A fresh policy to a peer with no SA: repeated packets, one ACQUIRE.
    # Nobody answers, so the packets wait (up to 8 for 1 s) and are then
    # dropped, each counted once as no-sa.
    c = net.da.control
    before = net.da.counters()["no-sa"]
    mon = subprocess.Popen([str(tunsec_bin()), "setkey", "-x", "--control", str(c)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        r = ctl(c, "spdadd 10.77.0.1 10.77.0.2 udp -P out priority 5 ipsec ah/transport//require;")
        assert r["ok"], r
        for _ in range(5):
            net.run(net.a, sys.executable, "-c",
                    "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('10.77.0.2', 9))",
                    check=False)
            time.sleep(0.1)
        time.sleep(1.5)
    finally:
        mon.terminate()
        out = mon.communicate(timeout=10)[0]
        ctl(c, "spddelete 10.77.0.1 10.77.0.2 udp -P out;")
    lines = [l for l in out.splitlines() if l.startswith("ACQUIRE")]
    assert lines == [lines[0]] and lines[0].startswith("ACQUIRE 10.77.0.1 10.77.0.2 ah policy"), out
    assert net.da.counters()["no-sa"] - before == 5


def test_an_sa_that_comes_and_goes_answers_the_acquire(net):
    """An outbound SA added and deleted at once (a negotiation's SA used
    briefly, then torn down) answers the ACQUIRE, as the kernel's larval
    state is replaced by the SA: the next packet raises a new one, and
    not 30 s later. The main loop looks at events every 100 ms; both
    changes land between two of its looks."""
    c = net.da.control
    udp = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           "s.sendto(b'x', ('10.77.0.2', 9))")
    mon = subprocess.Popen([str(tunsec_bin()), "setkey", "-x", "--control", str(c)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        # A reqid of its own: the ACQUIRE of test_monitor_prints_acquire_once
        # (same hosts, AH, no reqid) stays pending for 30 s.
        r = ctl(c, "spdadd 10.77.0.1 10.77.0.2 udp -P out priority 5 ipsec ah/transport//unique:4242;")
        assert r["ok"], r
        net.run(net.a, sys.executable, "-c", udp, check=False)
        time.sleep(0.5)
        sa = "10.77.0.1 10.77.0.2 ah 0x4242"
        r = ctl(c, f"add {sa} -u 4242 -A hmac-sha256 0x{'11' * 32};")
        assert r["ok"], r
        r = ctl(c, f"delete {sa};")
        assert r["ok"], r
        time.sleep(0.5)
        net.run(net.a, sys.executable, "-c", udp, check=False)
        time.sleep(0.5)
    finally:
        mon.terminate()
        out = mon.communicate(timeout=10)[0]
        ctl(c, "spddelete 10.77.0.1 10.77.0.2 udp -P out;")
    lines = [l for l in out.splitlines() if l.startswith("ACQUIRE")]
    assert len(lines) == 2 and all(l.startswith("ACQUIRE 10.77.0.1 10.77.0.2 ah policy") and "4242" in l
                                   for l in lines), out


def test_strangers_and_hostile_clients_are_refused(net):
    c = net.db.control
    assert oct(os.stat(c).st_mode & 0o777) == "0o600"
    # another user: refused with a message (the 0600 mode stops them first)
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "try:\n s.connect(sys.argv[1]); print(s.recv(4096).decode())\n"
            "except PermissionError as e: print('EACCES')\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code, str(c)],
                       capture_output=True, text=True, timeout=30)
    assert "EACCES" in r.stdout or "permission denied" in r.stdout, r
    # garbage gets errors, then the connection is closed; the daemon lives on
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(c))
    replies = []
    for i in range(25):
        try:
            s.send(bytes([0xff, 0xfe, i]) if i % 2 else b"spdadd nonsense here;")
            data = s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            break
        if not data:
            break
        replies.append(json.loads(data))
    assert all(not r["ok"] for r in replies), replies
    assert any("too many failed requests" in r["error"] for r in replies), replies[-3:]
    assert len(replies) <= 21
    assert net.db.alive()
    assert ctl(c, "stats;")["ok"]


def test_policy_changes_reach_routes_and_nftables(net):
    """An SPD change through the control socket updates tunsec's nftables
    table (and routes) in the same step; a refused change leaves both."""
    c = net.db.control

    def table():
        return net.run(net.b, "nft", "list", "table", "inet", "tunsec_tsec0").stdout

    assert "dport 7777" not in table()
    r = ctl(c, "spdadd 10.77.0.1[any] 10.77.0.2[7777] tcp -P in priority 1 discard;")
    assert r["ok"], r
    t = table()
    assert re.search(r"dport 7777 counter packets \d+ bytes \d+ drop", t), t
    # a new peer gets a route into the TUN device
    r = ctl(c, "spdadd 10.77.0.2 10.77.0.99 any -P out ipsec esp/transport//require;")
    assert r["ok"], r
    routes = net.run(net.b, "ip", "route", "show", "table", "all").stdout
    assert "10.77.0.99 dev tsec0" in routes, routes
    # a batch that fails halfway changes neither
    r = ctl(c, "spddelete 10.77.0.1[any] 10.77.0.2[7777] tcp -P in;\nspddelete 10.77.0.5 10.77.0.6 any -P in;")
    assert not r["ok"] and r["error"].startswith("control:2: no policy"), r
    assert "dport 7777" in table()
    r = ctl(c, "spddelete 10.77.0.1[any] 10.77.0.2[7777] tcp -P in;\nspddelete 10.77.0.2 10.77.0.99 any -P out;")
    assert r["ok"], r
    assert "dport 7777" not in table()
    assert "10.77.0.99" not in net.run(net.b, "ip", "route", "show", "table", "all").stdout


def test_a_route_the_kernel_refuses_takes_the_batch_back(net):
    """A batch of outbound policies whose routes the kernel accepts but
    one (a source address that is not this host's: EINVAL) changes
    nothing: the routes made are removed, and tunsec's record of the routes
    in force is what it was (the same policies then go in, each with its
    routes, and come out)."""
    c = net.db.control

    def routes():
        return net.run(net.b, "ip", "route", "show", "table", "all").stdout

    before = routes()
    good = [f"10.77.0.{90 + i}" for i in range(5)]
    batch = [f"spdadd 10.77.0.2 {d} any -P out ipsec esp/transport//require;" for d in good]
    batch.append("spdadd 10.77.0.55 10.77.0.96 any -P out ipsec esp/transport//require;")
    r = ctl(c, "\n".join(batch))
    assert not r["ok"] and "policies not applied" in r["error"] and "src 10.77.0.55" in r["error"], r
    assert routes() == before
    assert "10.77.0.90" not in json.dumps(ctl(c, "spddump;"))
    r = ctl(c, "\n".join(batch[:-1]))
    assert r["ok"], r
    now = routes()
    for d in good:
        assert f"{d} dev tsec0" in now and f"blackhole {d} " in now, now
    r = ctl(c, "\n".join(f"spddelete 10.77.0.2 {d} any -P out;" for d in good))
    assert r["ok"], r
    assert routes() == before


def test_dead_and_silent_clients_stall_nothing(net):
    """Clients that connect and never speak, and a monitor that never reads
    its events, neither delay other clients nor the data plane."""
    c = net.db.control
    idle = []
    for _ in range(8):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(c))
        idle.append(s)
    mon = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mon.connect(str(c))
    mon.send(b"monitor;")
    assert json.loads(mon.recv(65536))["ok"]
    # events the monitor will never read: ACQUIREs for a policy without SAs
    assert ctl(c, "spdadd 10.77.0.2 10.77.0.1 udp -P out priority 3 ipsec ah/transport//require;")["ok"]
    for port in range(20):
        net.run(net.b, sys.executable, "-c",
                f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('10.77.0.1', {9000 + port}))",
                check=False)
    try:
        t = time.monotonic()
        assert ctl(c, "stats;")["ok"]
        assert time.monotonic() - t < 1.0, "a stats request waited behind silent clients"
        # the workers still move packets: ICMP goes through tunsec's bypass path
        ping(net, net.b, A4, count=3)
        assert net.db.alive()
    finally:
        assert ctl(c, "spddelete 10.77.0.2 10.77.0.1 udp -P out;")["ok"]
        for s in idle + [mon]:
            s.close()
