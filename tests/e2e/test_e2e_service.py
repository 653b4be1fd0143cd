"""tunsec as the systemd unit packaging/tunsec@.service runs it, without
systemd (PID 1 here is not systemd): the unit's ExecStart with %i and its
Environment= expanded, under the credentials its sandbox gives
(CapabilityBoundingSet, AmbientCapabilities, SecureBits, NoNewPrivileges,
emulated with setpriv), with NOTIFY_SOCKET pointing at a socket of this
test. Checked: READY=1 comes only once the daemon answers on its control
socket; `systemctl reload` (the unit's ExecReload, $MAINPID expanded)
applies a changed file as one batch while a TCP transfer runs through the
kept SAs, and a broken file is refused with FILE:LINE and changes
nothing (state, routes, rules, nftables); SIGTERM (systemctl stop) sends
STOPPING=1 and restores the namespace.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from e2elib import (
    A4, B4, REPO_ROOT, make_topology, mkconf, snapshot, snapshot_diff, tcp_transfer_check, tcp_transfer_start,
    tunsec_bin,
)

UNIT = REPO_ROOT / "packaging" / "tunsec@.service"
INSTANCE = "svce2e"


def unit_service() -> dict[str, list[str]]:
    """The [Service] section: key -> values in order."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def expand(cmdline: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion of a command line (the subset the unit uses):
    `${VAR}` is one word, a word `$VAR` splits into words."""
    words = []
    for w in shlex.split(cmdline):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", w)
        if m:
            words += env.get(m.group(1), "").split()
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), w))
    return words


def unit_env(svc: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for assignments in svc.get("Environment", []):
        for a in shlex.split(assignments.replace("%i", INSTANCE)):
            k, _, v = a.partition("=")
            env[k] = v
    return env


def setpriv_argv(svc: dict[str, list[str]]) -> list[str]:
    """setpriv doing what systemd does with the unit's credentials."""
    def caps(key):
        names = " ".join(svc.get(key, [])).split()
        assert names, f"the unit sets no {key}"
        return ",".join(["-all"] + ["+" + n.lower().removeprefix("cap_") for n in names])
    argv = ["setpriv", "--bounding-set", caps("CapabilityBoundingSet"), "--inh-caps", caps("AmbientCapabilities"),
            "--ambient-caps", caps("AmbientCapabilities")]
    if svc.get("SecureBits") == ["noroot-locked"]:
        argv += ["--securebits", "+noroot,+noroot_locked"]
    else:
        assert not svc.get("SecureBits"), "setpriv emulation knows noroot-locked only"
    if svc.get("NoNewPrivileges") == ["yes"]:
        argv.append("--no-new-privs")
    return argv


class Notify:
    """The supervisor's end of NOTIFY_SOCKET (a path: an abstract socket
    belongs to a network namespace, and the daemon runs in another)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.got: list[dict[str, str]] = []

    def wait(self, key: str, value: str = "1", timeout: float = 20) -> dict[str, str]:
        """The next message setting key=value (earlier ones are kept)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            assert left > 0, f"no {key}={value} within {timeout}s; got {self.got}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = dict(ln.split("=", 1) for ln in data.decode().splitlines() if ln)
            self.got.append(msg)
            if msg.get(key) == value:
                return msg


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "svc")
    topo.a_conf, topo.b_conf = mkconf("gcm", topo.workdir / "conf")
    return topo


def control_json(net, control: Path, *args: str) -> dict:
    r = net.run(net.a, str(tunsec_bin()), "setkey", "--control", str(control), *args, "--json")
    return json.loads(r.stdout)


def sa_rows(net, control) -> dict[int, dict]:
    return {sa["spi"]: sa for sa in control_json(net, control, "-D")["sas"]}


def policy_texts(net, control) -> list[str]:
    return sorted(p["text"] for p in control_json(net, control, "-DP")["policies"])


def test_the_units_command_line_notifies_reloads_and_stops(net):
    svc = unit_service()
    assert svc["Type"] == ["notify"]
    env = unit_env(svc)
    assert env["TUNSEC_TUN"] == f"ts-{INSTANCE}"
    (exec_start,) = svc["ExecStart"]
    argv = expand(exec_start.replace("%i", INSTANCE), env)
    assert argv[:2] == ["/usr/bin/tunsec", "run"], argv
    control = Path(f"/run/tunsec/{INSTANCE}.sock")
    assert argv[argv.index("--control") + 1] == str(control)
    assert argv[argv.index("--tun") + 1] == f"ts-{INSTANCE}"
    # The installed paths, here: the binary under test, /etc/tunsec in
    # the test's directory.
    etc = net.workdir / "etc"
    etc.mkdir()
    conf = etc / f"{INSTANCE}.conf"
    assert argv[argv.index("--config") + 1] == f"/etc/tunsec/{INSTANCE}.conf"
    argv = [str(tunsec_bin()) if a == "/usr/bin/tunsec" else a.replace("/etc/tunsec/", f"{etc}/") for a in argv]
    original = net.a_conf.read_text()
    conf.write_text(original)

    before = snapshot(net, net.a)
    notify = Notify(net.workdir / "notify")
    log_path = net.workdir / "service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", net.a, *setpriv_argv(svc), *argv], stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, **env, "RUST_LOG": "info", "NOTIFY_SOCKET": str(notify.path)})
    mainpid = proc.pid  # ip netns exec and setpriv exec tunsec: one pid

    def log() -> str:
        return log_path.read_text(errors="replace")

    try:
        ready = notify.wait("READY")
        # Ready means ready: the control socket answers at once, the log
        # says up, and the credentials are the unit's.
        assert " up: " in log(), log()
        assert "STATUS" in ready and ready["STATUS"].startswith("up: "), ready
        sas = sa_rows(net, control)
        assert len(sas) == 4, sas
        status = Path(f"/proc/{mainpid}/status").read_text()
        caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
        net_admin_raw = (1 << 12) | (1 << 13)
        assert caps["CapBnd"] == net_admin_raw and caps["CapEff"] == net_admin_raw, status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        db = net.daemon(net.b, net.b_conf).start()

        # The reload: keep the IPv4 SAs (a transfer runs through them),
        # drop the IPv6 SA A -> B, add an SA and an inbound bypass (a
        # policy change: the nftables table changes with it).
        lines = original.splitlines()
        v6_out = next(ln for ln in lines if ln.startswith("add fd77::1 fd77::2 esp"))
        v6_spi = int(v6_out.split()[4], 16)
        v4_out = next(ln for ln in lines if ln.startswith(f"add {A4} {B4} esp"))
        v4_spi = int(v4_out.split()[4], 16)
        # (To another peer: a new SA A -> B would take over the flow, the
        # newest SA winning as in a rekey, with a key B does not have.)
        new_sa = f"add {A4} 10.77.0.99 esp 0x4242 -r 64 -E aes-gcm-16 0x{'ab' * 20};"
        bypass = f"spdadd {B4}/32 {A4}/32 udp -P in priority 5 none;"
        new_text = "\n".join([ln for ln in lines if ln != v6_out] + [new_sa, bypass]) + "\n"
        nft_before = net.run(net.a, "nft", "list", "table", "inet", f"tunsec_ts_{INSTANCE}").stdout
        policies_before = policy_texts(net, control)

        tx, rx = tcp_transfer_start(net, net.a, net.b, B4, 5701, duration=4, rate=2_000_000)
        time.sleep(1.5)
        seq_before = sa_rows(net, control)[v4_spi]["seq"]
        assert seq_before > 0, "the transfer goes through the IPv4 SA"
        conf.write_text(new_text)
        (exec_reload,) = svc["ExecReload"]
        subprocess.run(expand(exec_reload, {"MAINPID": str(mainpid)}), check=True)
        reloading = notify.wait("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0, reloading
        done = notify.wait("READY")
        assert done["STATUS"].startswith(f"reloaded {conf}: "), done
        assert ("SAs: 1 added, 0 replaced, 1 removed, 3 kept; "
                "policies: 1 added, 0 replaced, 0 removed, 8 kept") in done["STATUS"], done
        tcp_transfer_check(tx, rx, None)

        after = sa_rows(net, control)
        assert set(after) == set(sas) - {v6_spi} | {0x4242}, after
        assert after[v4_spi]["seq"] > seq_before, "the kept SA's sequence numbers went on"
        added = set(policy_texts(net, control)) - set(policies_before)
        assert set(policies_before) <= set(policy_texts(net, control)), "no policy lost"
        assert added == {f"{B4}/32[any] {A4}/32[any] 17 -P in priority 5 none"}, policy_texts(net, control)
        nft_after = net.run(net.a, "nft", "list", "table", "inet", f"tunsec_ts_{INSTANCE}").stdout
        assert nft_after != nft_before, "the inbound bypass reached nftables"

        # A broken file: refused with FILE:LINE, nothing changes.
        state_before = (sorted(after), policy_texts(net, control))
        plumbing_before = snapshot(net, net.a)
        broken = new_text + "add 10.77.0.1 10.77.0.2 esp 0x4343 -E aes-gcm-16 0x00;\n"
        bad_line = len(broken.splitlines())
        conf.write_text(broken)
        os.kill(mainpid, signal.SIGHUP)
        failed = notify.wait("READY")
        assert failed["STATUS"].startswith(f"reload failed, nothing changed: {conf}:{bad_line}: "), failed
        assert re.search(rf"ERROR .*reload failed, nothing changed: {re.escape(str(conf))}:{bad_line}: ", log()), log()
        assert (sorted(sa_rows(net, control)), policy_texts(net, control)) == state_before
        now = snapshot(net, net.a)
        assert now == plumbing_before, snapshot_diff(plumbing_before, now)
        tcp_transfer_check(*tcp_transfer_start(net, net.a, net.b, B4, 5702, 300_000), 300_000)

        # systemctl stop: SIGTERM to the main process.
        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait("STOPPING")
        assert stopping.get("STATUS", "").startswith("stopping"), stopping
        assert proc.wait(timeout=30) == 0, log()
        assert "tunsec down" in log()
        db.stop()
        now = snapshot(net, net.a)
        assert now == before, snapshot_diff(before, now)
        assert not control.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
