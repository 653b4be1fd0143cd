"""Soak (issue 11), off by default: TUNSEC_SOAK=SECONDS (600 for the
issue's ten minutes). TCP both ways with their bytes checked, a rekey
every 5 s through the control sockets (new SAs in, make-before-break,
old ones deleted a second later), a malformed flood at B beside it, and
both daemons' RSS sampled every 2 s into WORKDIR/soak-rss.csv (and
$TUNSEC_SOAK_OUT if set). At the end: every packet A sealed B accepted
and the other way round (the flood's are the only drops), and the RSS
of the second half stays within a few MiB of the first's."""

import os
import secrets
import shutil
import subprocess
import time

import pytest

from e2elib import A4, A6, B4, B6, IFACE_A, IFACE_B, make_topology, tcp_transfer_check, tcp_transfer_start, \
    tunsec_bin

SOAK = float(os.environ.get("TUNSEC_SOAK", "0"))
RATE = 5e6  # bytes/s each way

pytestmark = pytest.mark.skipif(SOAK <= 0, reason="set TUNSEC_SOAK=SECONDS to run the soak")


def conf(me4, peer4, me6, peer6):
    lines = ["flush;", "spdflush;"]
    for f, me, peer in (("icmp", me4, peer4), ("icmp6", me6, peer6)):
        any_ = "0.0.0.0/0" if f == "icmp" else "::/0"
        lines += [f"spdadd {any_} {any_} {f} -P out priority 10 none;",
                  f"spdadd {any_} {any_} {f} -P in priority 10 none;"]
    for me, peer in ((me4, peer4), (me6, peer6)):
        lines += [f"spdadd {me} {peer} any -P out ipsec esp/transport//require;",
                  f"spdadd {peer} {me} any -P in ipsec esp/transport//require;"]
    return "\n".join(lines) + "\n"


def setkey(control, text):
    r = subprocess.run([str(tunsec_bin()), "setkey", "--control", str(control), "-c"], input=text,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"setkey: {r.stdout}{r.stderr}\n{text}"


def sa(src, dst, spi, key):
    return f"add {src} {dst} esp {spi:#x} -r 4096 -E aes-gcm-16 0x{key};\n"


def test_soak(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "sok")
    (topo.workdir / "a.conf").write_text(conf(A4, B4, A6, B6))
    (topo.workdir / "b.conf").write_text(conf(B4, A4, B6, A6))
    da = topo.daemon(topo.a, topo.workdir / "a.conf").start()
    db = topo.daemon(topo.b, topo.workdir / "b.conf").start()
    spi = [0x5000]

    def fresh():
        """New SAs for the four directions: {(src, dst): text}."""
        out = {}
        for src, dst in ((A4, B4), (B4, A4), (A6, B6), (B6, A6)):
            spi[0] += 1
            out[(src, dst)] = (spi[0], sa(src, dst, spi[0], secrets.token_hex(20)))
        return out

    def rekey(old):
        new = fresh()
        a_out = [k for k in new if k[0] in (A4, A6)]
        b_out = [k for k in new if k[0] in (B4, B6)]
        # Inbound first on both sides, then outbound: nothing is sealed
        # with an SA its receiver does not have yet.
        setkey(db.control, "".join(new[k][1] for k in a_out))
        setkey(da.control, "".join(new[k][1] for k in b_out))
        setkey(da.control, "".join(new[k][1] for k in a_out))
        setkey(db.control, "".join(new[k][1] for k in b_out))
        if old:
            time.sleep(1)  # what was sealed with the old SAs arrives
            text = "".join(f"delete {s} {d} esp {old[(s, d)][0]:#x};\n" for s, d in old)
            setkey(da.control, text)
            setkey(db.control, text)
        return new

    sas = rekey(None)
    ab = tcp_transfer_start(topo, topo.a, topo.b, B4, 5601, duration=SOAK, rate=RATE, timeout=SOAK + 120)
    ba = tcp_transfer_start(topo, topo.b, topo.a, A6, 5602, duration=SOAK, rate=RATE, timeout=SOAK + 120)
    flood = topo.tool(topo.a, "flood", "--iface", IFACE_A, "--src-mac", topo.mac(topo.a, IFACE_A),
                      "--dst-mac", topo.mac(topo.b, IFACE_B), "--a4", A4, "--b4", B4, "--a6", A6, "--b6", B6,
                      "--duration", str(SOAK), "--pps", "1000", "--seed", "77")
    csv = topo.workdir / "soak-rss.csv"
    rows = ["t,rss_a_kib,rss_b_kib"]
    t0 = time.monotonic()
    next_rekey = t0 + 5
    rekeys = 0
    while time.monotonic() < t0 + SOAK:
        assert da.alive() and db.alive(), f"a daemon died:\n{da.log()[-2000:]}\n{db.log()[-2000:]}"
        now = time.monotonic()
        if now >= next_rekey:
            sas = rekey(sas)
            rekeys += 1
            next_rekey += 5
        rows.append(f"{now - t0:.1f},{da.rss_kib()},{db.rss_kib()}")
        time.sleep(2)
    csv.write_text("\n".join(rows) + "\n")
    if os.environ.get("TUNSEC_SOAK_OUT"):
        shutil.copy(csv, os.environ["TUNSEC_SOAK_OUT"])
    sent = flood.result(120)
    r1 = tcp_transfer_check(*ab, None, timeout=120)
    r2 = tcp_transfer_check(*ba, None, timeout=120)
    assert r1["sent"]["bytes"] >= RATE * SOAK * 0.5 and r2["sent"]["bytes"] >= RATE * SOAK * 0.5, (r1, r2)
    time.sleep(1)
    fa, fb = da.stop(), db.stop()
    # Every packet one side sealed, the other accepted: no legitimate drop.
    assert fa["out_packets"] == fb["in_packets"], f"A sealed {fa['out_packets']}, B accepted {fb['in_packets']}"
    assert fb["out_packets"] == fa["in_packets"], f"B sealed {fb['out_packets']}, A accepted {fa['in_packets']}"
    assert fa["dropped"] == 0, fa.line
    # B's drops are the flood's: what it received and did not accept.
    assert fb["dropped"] == fb["net_rx"] - fb["in_packets"], fb.line
    assert 0 < fb["dropped"] <= sent["sent"], (fb.line, sent)
    samples = [tuple(int(x) for x in r.split(",")[1:]) for r in rows[1:]]
    half = len(samples) // 2
    for side in (0, 1):
        first = max(s[side] for s in samples[1:half])
        second = max(s[side] for s in samples[half:])
        print(f"RSS {'AB'[side]}: max first half {first} KiB, second half {second} KiB, "
              f"min {min(s[side] for s in samples)}, last {samples[-1][side]}")
        assert second <= first + 4096, f"RSS of {'AB'[side]} grew: {first} -> {second} KiB ({csv})"
    print(f"soak {SOAK:.0f} s: {rekeys} rekeys, flood {sent}, A {fa.line}, B {fb.line}")
