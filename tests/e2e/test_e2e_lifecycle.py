"""The daemon's footprint on a namespace: `--dry-run` prints the plan and
changes nothing; a run adds exactly its routes, rules and nftables table,
and stopping it (SIGINT or SIGTERM) leaves the namespace as it found it;
a restart works; a second instance on the same TUN device or control
path refuses to start and disturbs nothing.
"""

import re
import signal
import subprocess

import pytest

from e2elib import (
    A4, A6, B4, B6, TUN, make_topology, mkconf, snapshot, snapshot_diff, tcp_transfer_check, tcp_transfer_start,
    tunsec_bin,
)


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "5")
    topo.a_conf, topo.b_conf = mkconf("windows", topo.workdir / "conf")
    return topo


def tunsec_run(net, ns, conf, tun, control, *extra, timeout=20) -> subprocess.CompletedProcess:
    """`tunsec run` expected to exit by itself (refusal or --dry-run)."""
    return net.run(ns, str(tunsec_bin()), "run", "--config", str(conf), "--tun", tun, "--control", str(control),
                   *extra, check=False, timeout=timeout)


def dry_run(net, control):
    r = tunsec_run(net, net.a, net.a_conf, TUN, control, "--dry-run")
    assert r.returncode == 0, f"--dry-run exited {r.returncode}: {r.stdout}{r.stderr}"
    out = r.stdout
    m = re.search(r"^ip -4 rule add not fwmark (0x[0-9a-f]+) table (\d+) priority (\d+)$", out, re.M)
    assert m, f"no IPv4 rule in the plan:\n{out}"
    mark, table, prio = m.groups()
    expected = [
        f"ip -6 rule add not fwmark {mark} table {table} priority {prio}",
        f"ip -4 route replace {B4}/32 dev {TUN} table {table} src {A4}",
        f"ip -6 route replace {B6}/128 dev {TUN} table {table} src {A6}",
        "nft -f -",
    ]
    lines = [ln.strip() for ln in out.splitlines()]
    for e in expected:
        assert e in lines, f"{e!r} not in the plan:\n{out}"
    assert f"table inet tunsec_{TUN} {{" in lines, out
    # The peer's host-to-host policies refuse plaintext: elements of the
    # sets of refused pairs the input chain looks up.
    assert f"elements = {{ {B4} . {A4} }}" in out.split("set in4_2147483648_drop {")[1].split("\n  }")[0], out
    assert f"elements = {{ {B6} . {A6} }}" in out.split("set in6_2147483648_drop {")[1].split("\n  }")[0], out
    assert ("ip saddr . ip daddr @in4_2147483648_drop drop comment "
            "\"IPv4 policies from host to host at priority 2147483648: refused\"") in lines, out
    return out, mark, table, prio


def transfer(net, port):
    for fam, (a, b) in {"v4": (A4, B4), "v6": (A6, B6)}.items():
        tcp_transfer_check(*tcp_transfer_start(net, net.a, net.b, b, port, 1_000_000), 1_000_000)
        tcp_transfer_check(*tcp_transfer_start(net, net.b, net.a, a, port + 1, 1_000_000), 1_000_000)


def test_dry_run_prints_the_plan_and_changes_nothing(net):
    before = snapshot(net, net.a)
    control = net.workdir / "dry.sock"
    dry_run(net, control)
    after = snapshot(net, net.a)
    assert after == before, f"--dry-run changed the namespace:\n{snapshot_diff(before, after)}"
    assert not control.exists() and not control.with_name("dry.sock.lock").exists()


def test_stop_restores_the_namespace_and_restart_works(net):
    _, mark, table, prio = dry_run(net, net.workdir / "dry.sock")
    before = {ns: snapshot(net, ns) for ns in (net.a, net.b)}
    da, db = net.daemon(net.a, net.a_conf), net.daemon(net.b, net.b_conf)
    for round_ in (1, 2):
        da.start()
        db.start()
        running = snapshot(net, net.a)
        # What the plan said is what is there.
        rule = f"{prio}:\tnot from all fwmark {mark} lookup {table}"
        assert rule in running["rules"].splitlines() and rule in running["rules6"].splitlines(), running
        assert re.search(rf"^{re.escape(B4)} dev {TUN} table {table} .*src {re.escape(A4)}", running["routes"], re.M), running
        assert re.search(rf"^{re.escape(B6)} dev {TUN} table {table} ", running["routes6"], re.M), running
        assert f"table inet tunsec_{TUN}" in running["nft"], running
        assert TUN in running["links"].split()
        transfer(net, 5500 + 10 * round_)
        final_a = da.stop(signal.SIGINT)
        final_b = db.stop(signal.SIGTERM)
        assert final_a["out_packets"] > 0 and final_b["in_packets"] > 0, (final_a.line, final_b.line)
        for ns in (net.a, net.b):
            after = snapshot(net, ns)
            assert after == before[ns], f"round {round_}: {ns} not restored:\n{snapshot_diff(before[ns], after)}"


def test_stop_undoes_every_step_cleanly(net):
    """A normal stop undoes each applied step without an error (the log
    would otherwise show `undo failed` warnings for a clean shutdown)."""
    da = net.daemon(net.a, net.a_conf).start()
    da.stop()
    log = da.log()
    failed = [ln for ln in log.splitlines() if "undo failed" in ln or " WARN " in ln]
    assert failed == [], "\n".join(failed)


def test_second_instance_is_refused(net):
    c1 = net.workdir / "first.sock"
    da = net.daemon(net.a, net.a_conf, control=c1).start()
    db = net.daemon(net.b, net.b_conf).start()
    running = snapshot(net, net.a)

    # The same TUN device in the same namespace (another control path).
    r = tunsec_run(net, net.a, net.a_conf, TUN, net.workdir / "second.sock")
    msg = r.stdout + r.stderr
    assert r.returncode != 0, f"a second instance on {TUN} started:\n{msg}"
    assert TUN in msg and " up: " not in msg, msg
    # The same control path (another TUN device).
    r = tunsec_run(net, net.a, net.a_conf, "tsec1", c1)
    msg = r.stdout + r.stderr
    assert r.returncode != 0, f"a second instance on control path {c1} started:\n{msg}"
    assert str(c1) in msg and " up: " not in msg, msg
    # --dry-run beside a running instance changes nothing either.
    dry_run(net, net.workdir / "dry.sock")

    after = snapshot(net, net.a)
    assert after == running, f"a refused instance changed the namespace:\n{snapshot_diff(running, after)}"
    assert da.alive() and db.alive()
    transfer(net, 5600)
    da.stop()
    db.stop()


def test_two_namespaces_with_default_flags(net):
    """The project's main scenario with no --control: each namespace's
    daemon gets its own socket (they share /run), and `tunsec setkey`
    without --control finds the one of its namespace."""
    import os
    import time
    logs, procs = [], []
    try:
        for ns, conf in ((net.a, net.a_conf), (net.b, net.b_conf)):
            log = net.workdir / f"default-{ns}.log"
            logs.append(log)
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, str(tunsec_bin()), "run", "-c", str(conf)],
                                          stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                          env={**os.environ, "NO_COLOR": "1"}))
        end = time.monotonic() + 20
        while not all(" up: " in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            assert time.monotonic() < end, [log.read_text() for log in logs]
            time.sleep(0.05)
        for ns, peer in ((net.a, B4), (net.b, A4)):
            r = net.run(ns, str(tunsec_bin()), "setkey", "-D")
            assert f" {peer}" in r.stdout or f"{peer} " in r.stdout, r.stdout
        assert "net-" in logs[0].read_text(), "a namespace's default socket is named after it"
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=20)
