"""Least privilege (issue 11): once set up, `tunsec run` keeps only
CAP_NET_ADMIN and CAP_NET_RAW (effective, permitted, bounding, and
inheritable and ambient for the `nft` it runs) in every thread, with no-new-privs, and still
carries traffic, applies a policy change (routes over rtnetlink, the
nftables table through `nft`) and stops cleanly. Its key material is in
memory that no core dump holds: `gcore` of a running daemon (which root
can take even of a non-dumpable process) has none of its keys, neither
from the configuration file nor from the control socket, while it has an
ordinary marker from the process's environment."""

import os
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from e2elib import A4, B4, find_sa, make_topology, mkconf, parse_sas, snapshot, snapshot_diff, tcp_transfer_check, \
    tcp_transfer_start, tunsec_bin

KEPT = (1 << 12) | (1 << 13)  # CAP_NET_ADMIN, CAP_NET_RAW


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "prv")
    topo.before = snapshot(topo, topo.a)
    topo.conf = mkconf("windows", topo.workdir / "conf")
    topo.marker = secrets.token_hex(16)
    os.environ["TUNSEC_E2E_MARKER"] = topo.marker
    try:
        topo.da = topo.daemon(topo.a, topo.conf[0]).start()
        topo.db = topo.daemon(topo.b, topo.conf[1]).start()
    finally:
        del os.environ["TUNSEC_E2E_MARKER"]
    yield topo


def setkey(control, *args, stdin=None):
    r = subprocess.run([str(tunsec_bin()), "setkey", "--control", str(control), *args], input=stdin,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"tunsec setkey {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def thread_status(pid: int) -> dict[str, dict[str, str]]:
    out = {}
    for t in sorted(Path(f"/proc/{pid}/task").iterdir()):
        fields = dict(ln.split(":\t", 1) for ln in (t / "status").read_text().splitlines() if ":\t" in ln)
        out[f"{fields['Name'].strip()}/{t.name}"] = {k: v.strip() for k, v in fields.items()}
    return out


def test_every_thread_keeps_net_admin_and_net_raw_only(net):
    for d in (net.da, net.db):
        threads = thread_status(d.pid)
        assert len(threads) >= 3, threads.keys()  # main, control, workers
        for name, st in threads.items():
            got = {k: int(st[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")}
            assert got == {"CapEff": KEPT, "CapPrm": KEPT, "CapBnd": KEPT, "CapInh": KEPT, "CapAmb": KEPT}, \
                f"{name}: {({k: hex(v) for k, v in got.items()})}"
            assert st["NoNewPrivs"] == "1", f"{name}: NoNewPrivs {st['NoNewPrivs']}"
            assert st["Uid"].split()[:2] == ["0", "0"], st["Uid"]
        assert "privileges: capabilities cap_net_admin, cap_net_raw only" in d.log(), d.log()
        # The workers (which parse what the network sends) run under their
        # seccomp allow-list (mode 2: filter); the others do not.
        modes = {name.split("/")[0]: st["Seccomp"] for name, st in threads.items()}
        workers = [n for n in modes if n.startswith("tunsec-w")]
        assert workers and all(modes[n] == "2" for n in workers), modes
        assert modes.get("tunsec-ctl") == "0", modes


def test_traffic_and_policy_changes_work_with_fewer_privileges(net):
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 7101, nbytes=3_000_000)
    # Outbound: a route into the TUN device (rtnetlink); inbound: the
    # nftables table is reloaded by `nft`, which runs with the daemon's
    # two capabilities.
    setkey(net.da.control, "-c", stdin=(
        "spdadd 10.77.0.1 10.77.9.9 any -P out ipsec esp/transport//require;\n"
        "spdadd 10.77.9.9 10.77.0.1 tcp -P in ipsec esp/transport//require;\n"))
    tcp_transfer_check(tx, rx, 3_000_000)
    routes = net.run(net.a, "ip", "route", "show", "table", "all").stdout
    assert "10.77.9.9 dev tsec0" in routes, routes
    nft = net.run(net.a, "nft", "list", "table", "inet", "tunsec_tsec0").stdout
    assert "ip saddr 10.77.9.9" in nft, nft
    setkey(net.da.control, "-c", stdin=(
        "spddelete 10.77.0.1 10.77.9.9 any -P out;\nspddelete 10.77.9.9 10.77.0.1 tcp -P in;\n"))
    nft = net.run(net.a, "nft", "list", "table", "inet", "tunsec_tsec0").stdout
    assert "10.77.9.9" not in nft, nft
    assert "undo failed" not in net.da.log() and "failed" not in net.da.log(), net.da.log()


def hexkey(k: str) -> str:
    return k[2:].lower() if k.startswith("0x") else k.lower()


def test_a_core_dump_holds_no_key(net):
    """Keys from the file (AES-CBC, HMAC-SHA1, AH) and from the control
    socket (AES-GCM, in AWS-LC's contexts), after traffic and a dump with
    keys (`-D -k`, a reply that carries them): none is in `gcore`'s core,
    as bytes or as hex text. The AES key is also the first round key of
    its schedule, so a schedule outside the arena would show too."""
    gcm_in = "c0ffee" + secrets.token_hex(17)  # 20 bytes: AES-128 key + salt
    gcm_out = "badc0de" + secrets.token_hex(16) + "0"
    setkey(net.da.control, "-c", stdin=(
        f"add 10.77.0.1 10.77.9.8 esp 0x7701 -r 64 -E aes-gcm-16 0x{gcm_out};\n"
        f"add 10.77.9.8 10.77.0.1 esp 0x7702 -r 64 -E aes-gcm-16 0x{gcm_in};\n"))
    dump = setkey(net.da.control, "-D", "-k")
    assert gcm_in in dump.lower()
    tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 7102, nbytes=1_000_000)
    tcp_transfer_check(tx, rx, 1_000_000)

    keys = {"gcm-in": gcm_in, "gcm-out": gcm_out}
    sas = parse_sas(net.conf[0])
    for proto in ("esp", "ah"):
        for src, dst in ((A4, B4), (B4, A4)):
            sa = find_sa(sas, src, dst, proto)
            if sa.enc_key:
                keys[f"{proto} {src} enc"] = hexkey(sa.enc_key)
            keys[f"{proto} {src} auth"] = hexkey(sa.auth_key)
    prefix = net.workdir / "core"
    r = subprocess.run(["gcore", "-o", str(prefix), str(net.da.pid)], capture_output=True, text=True, timeout=120)
    core = Path(f"{prefix}.{net.da.pid}")
    assert core.exists(), f"gcore failed: {r.stdout}{r.stderr}"
    data = core.read_bytes()
    core.unlink()
    assert net.da.alive()
    # The search works: an ordinary string of the process is there.
    assert net.marker.encode() in data, "the environment's marker is missing: the core is not the process's"
    found = []
    for name, k in keys.items():
        raw = bytes.fromhex(k)
        for what, needle in (("bytes", raw), ("first 16 bytes", raw[:16]), ("hex", k.encode()),
                             ("HEX", k.upper().encode())):
            if needle in data:
                found.append(f"{name} ({what}) at {data.index(needle):#x}")
    assert not found, f"key material in the core ({len(data)} bytes): {found}"


def test_a_clean_stop_restores_the_namespace(net):
    net.da.stop()
    net.db.stop()
    log = net.da.log()
    assert "undo failed" not in log, log
    diff = snapshot_diff(net.before, snapshot(net, net.a))
    assert not diff, diff
