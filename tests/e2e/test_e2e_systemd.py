"""The package's unit under a real systemd: tunsec@demo.service started by
systemd 252 booted in a container (systemd-nspawn --boot) whose network
namespace is host A of the demo (netns/up.sh, netns/mkconf.sh windows:
ESP aes-cbc + hmac-sha1 under AH hmac-sha1, IPv4 and IPv6); host B is a
`tunsec run` started by hand in the other namespace.

Off unless TUNSEC_SYSTEMD_ROOT names a Debian tree with systemd and the
tunsec package installed: scripts/test-package.sh sets it (and TUNSEC_BIN
to the packaged binary) after installing the .deb in a fresh Debian 12.
The tree is booted on a volatile overlay (--volatile=overlay): the boot
changes nothing in it. /etc/tunsec is a directory of this test, bound in.

Checked: `systemctl start` returns once tunsec said READY=1 (Type=notify)
and the control socket answers at once; the main process has CAP_NET_ADMIN
and CAP_NET_RAW only, no-new-privs and a seccomp filter; TCP both ways
and both families is AH+ESP on the wire and arrives intact; `systemctl
reload` applies a changed file (journal and STATUS say what changed);
a broken file is refused with FILE:LINE in the journal at priority err,
and nothing changes (SAs, policies, routes, rules, nftables, main PID);
`systemd-analyze security` gives the unit's exposure (printed);
`systemctl stop` restores the namespace exactly.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2elib import (
    A4, A6, AH_ESP_LINE, B4, B6, IFACE_B, PROTO_TCP, PROTO_UDP, Capture, ip_packets, make_topology, mkconf,
    snapshot, snapshot_diff, tcp_transfer_check, tcp_transfer_start, tcpdump_read,
)

ROOT = os.environ.get("TUNSEC_SYSTEMD_ROOT", "")
INSTANCE = "demo"
UNIT = f"tunsec@{INSTANCE}.service"
CONF_IN = f"/etc/tunsec/{INSTANCE}.conf"
CONTROL = f"/run/tunsec/{INSTANCE}.sock"
NET_ADMIN_RAW = (1 << 12) | (1 << 13)

pytestmark = pytest.mark.skipif(not ROOT, reason="TUNSEC_SYSTEMD_ROOT is not set (scripts/test-package.sh sets it)")


class Container:
    """systemd booted by systemd-nspawn in a network namespace; commands
    run inside with nsenter (no machined here to register with)."""

    def __init__(self, log: Path):
        self.log_path = log
        self.p: subprocess.Popen | None = None
        self.init = 0

    def boot(self, root: str, netns: str, etc: Path) -> None:
        log = self.log_path
        # CAP_NET_ADMIN: nspawn keeps it only with --private-network, not
        # with a network namespace given by path. @memlock: nspawn's own
        # seccomp filter refuses mlock(2) (EPERM) to a container without
        # CAP_IPC_LOCK, whatever RLIMIT_MEMLOCK says; a host's systemd
        # has no such filter, and tunsec locks its key arena.
        argv = ["systemd-nspawn", "-D", root, "--volatile=overlay", "--boot", "--register=no", "--keep-unit",
                "--console=pipe", f"--network-namespace-path=/run/netns/{netns}", "--capability=CAP_NET_ADMIN",
                "--system-call-filter=@memlock", "--bind=/dev/net/tun", f"--bind={etc}:/etc/tunsec"]
        with open(log, "wb") as f:
            self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        end = time.monotonic() + 30
        while not self.init:
            assert self.p.poll() is None, f"systemd-nspawn exited {self.p.returncode}:\n{self.log()}"
            assert time.monotonic() < end, f"no init process under systemd-nspawn after 30 s:\n{self.log()}"
            kids = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read_text().split()
            for k in kids:
                if Path(f"/proc/{k}/comm").read_text().strip() == "systemd":
                    self.init = int(k)
            time.sleep(0.1)
        # Until systemd listens on its private socket, systemctl cannot
        # connect; then it waits for the boot to finish.
        while True:
            r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=90)
            if r.stdout.strip() or time.monotonic() > end + 60:
                break
            time.sleep(0.2)
        assert r.stdout.strip() in ("running", "degraded"), \
            f"systemd in the container: {r.stdout}{r.stderr}\n{self.run('systemctl', '--failed', check=False).stdout}"
        self.state = r.stdout.strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(["nsenter", "-t", str(self.init), "-a", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                            *argv], capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{' '.join(argv)} in the container exited {r.returncode}:\n{r.stdout}{r.stderr}"
        return r

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *flags: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", UNIT, *flags).stdout

    def wait_journal(self, pattern: str, *flags: str, timeout: float = 10) -> re.Match:
        end = time.monotonic() + timeout
        while not (m := re.search(pattern, self.journal(*flags), re.M)):
            assert time.monotonic() < end, f"journal of {UNIT} has no /{pattern}/:\n{self.journal()}"
            time.sleep(0.1)
        return m

    def poweroff(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)  # nspawn: halt the container
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    assert Path(ROOT, "usr/bin/tunsec").exists(), f"{ROOT}: tunsec is not installed there"
    assert Path(ROOT, "usr/lib/systemd/system/tunsec@.service").exists(), f"{ROOT}: no unit"
    topo = make_topology(request, tmp_path_factory, "sysd")
    topo.a_conf, topo.b_conf = mkconf("windows", topo.workdir / "conf")
    topo.etc = topo.workdir / "etc"
    topo.etc.mkdir(mode=0o700)
    topo.conf = topo.etc / f"{INSTANCE}.conf"
    topo.conf.write_text(topo.a_conf.read_text())
    topo.conf.chmod(0o600)
    topo.before = snapshot(topo, topo.a)
    c = Container(topo.workdir / "nspawn.log")
    request.addfinalizer(c.poweroff)  # before the namespaces go (finalizers run last first)
    c.boot(ROOT, topo.a, topo.etc)
    topo.c = c
    print(f"systemd {c.run('systemctl', '--version').stdout.split()[1]} booted in {topo.a}: {c.state}")
    yield topo


def sas(c: Container) -> list[tuple]:
    """The SAD (`tunsec setkey -D --json` in the container), without what
    traffic moves."""
    out = json.loads(c.run("tunsec", "setkey", "--control", CONTROL, "-D", "--json").stdout)
    return sorted((s["src"], s["dst"], s["proto"], s["spi"], s["enc"], s["auth"], s["replay"]) for s in out["sas"])


def policies(c: Container) -> list[str]:
    out = json.loads(c.run("tunsec", "setkey", "--control", CONTROL, "-DP", "--json").stdout)
    return sorted(p["text"] for p in out["policies"])


def test_unit_under_systemd(net):
    c = net.c
    db = net.daemon(net.b, net.b_conf).start()

    # Start: systemctl returns once READY=1 came (Type=notify).
    t0 = time.monotonic()
    c.run("systemctl", "start", UNIT)
    started = time.monotonic() - t0
    st = c.show("Type", "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts", "Result")
    assert st["Type"] == "notify" and st["ActiveState"] == "active" and st["SubState"] == "running", st
    assert st["StatusText"].startswith("up: 8 policies, 8 SAs"), st
    assert len(sas(net.c)) >= 8, "the control socket answers once systemctl start returned"
    main = st["MainPID"]
    print(f"systemctl start: {started:.2f} s, {st}")

    # Credentials, as the kernel has them.
    status = c.run("cat", f"/proc/{main}/status").stdout
    caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
    for k in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert caps[k] == NET_ADMIN_RAW, f"{k} {caps[k]:#x}, not CAP_NET_ADMIN+CAP_NET_RAW:\n{status}"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^Seccomp:\s+2$", status, re.M), status
    # The workers add their own allow-list to systemd's filter (the unit
    # must allow seccomp(2) for that).
    filters = {}
    for task in c.run("ls", f"/proc/{main}/task").stdout.split():
        t = c.run("cat", f"/proc/{main}/task/{task}/status", check=False).stdout
        if m := re.search(r"^Name:\s+(\S+)$", t, re.M):
            filters[m.group(1)] = int(re.search(r"^Seccomp_filters:\s+(\d+)$", t, re.M).group(1))
    workers = {k: v for k, v in filters.items() if re.fullmatch(r"tunsec-w\d+", k)}
    assert workers and all(v == filters["tunsec"] + 1 for v in workers.values()), \
        f"seccomp filters per thread: {filters}\n{c.journal()}"
    priv = c.wait_journal(r"^privileges: .*$").group(0)
    assert "capabilities cap_net_admin, cap_net_raw only" in priv and "locked, not dumped" in priv, priv
    memlock = re.search(r"^Max locked memory\s+(\S+)\s+(\S+)", c.run("cat", f"/proc/{main}/limits").stdout, re.M)
    print(f"/proc/{main}/status: " + ", ".join(f"{k} {v:016x}" for k, v in caps.items())
          + f"; NoNewPrivs 1, Seccomp 2; RLIMIT_MEMLOCK {memlock.group(1)}/{memlock.group(2)}")

    # Traffic both ways, both families: AH+ESP on the wire, intact.
    cap = Capture(net, net.b, IFACE_B, net.workdir / "wire.pcap")
    t4 = tcp_transfer_start(net, net.a, net.b, B4, 5801, nbytes=1_000_000)
    t6 = tcp_transfer_start(net, net.b, net.a, A6, 5802, nbytes=1_000_000)
    tcp_transfer_check(*t4, 1_000_000)
    tcp_transfer_check(*t6, 1_000_000)
    cap.stop()
    text = tcpdump_read(net.workdir / "wire.pcap")
    seen = {(m.group("src"), m.group("dst")) for m in AH_ESP_LINE.finditer(text)}
    assert {(A4, B4), (B4, A4), (A6, B6), (B6, A6)} <= seen, f"AH+ESP seen only {seen}:\n{text[:3000]}"
    clear = [p for p in ip_packets(net.workdir / "wire.pcap") if p.proto in (PROTO_TCP, PROTO_UDP)]
    assert not clear, f"{len(clear)} TCP/UDP packets in the clear"

    # Reload: one SA more.
    before = sas(c)
    text = net.conf.read_text()
    net.conf.write_text(text + f"add {A4} 10.77.0.99 esp 0x4242 -r 64 -E aes-gcm-16 0x{'ab' * 20};\n")
    c.run("systemctl", "reload", UNIT)
    c.wait_journal(rf"reloaded {CONF_IN}: SAs: 1 added, 0 replaced, 0 removed, 8 kept; policies: 0 added, "
                   r"0 replaced, 0 removed, 8 kept")
    st = c.show("ActiveState", "StatusText", "MainPID")
    assert st["ActiveState"] == "active" and st["MainPID"] == main and st["StatusText"].startswith("reloaded"), st
    assert set(sas(c)) - set(before) == {(A4, "10.77.0.99", "esp", 0x4242, "aes-gcm-16", "null", 64)}, sas(c)
    tcp_transfer_check(*tcp_transfer_start(net, net.a, net.b, B4, 5803, nbytes=300_000), 300_000)

    # A broken file: refused, FILE:LINE in the journal at priority err,
    # nothing changes.
    state = (sas(c), policies(c), snapshot(net, net.a))
    broken = net.conf.read_text() + "add 10.77.0.1 10.77.0.98 esp 0x4343 -E nonsense 0x00;\n"
    bad_line = len(broken.splitlines())
    net.conf.write_text(broken)
    c.run("systemctl", "reload", UNIT)
    m = c.wait_journal(rf"^reload failed, nothing changed: {CONF_IN}:{bad_line}: .*$", "-p", "err")
    print(f"journal, priority err: {m.group(0)}")
    st = c.show("ActiveState", "StatusText", "MainPID", "NRestarts")
    assert st["ActiveState"] == "active" and st["MainPID"] == main and st["NRestarts"] == "0", st
    assert st["StatusText"].startswith(f"reload failed, nothing changed: {CONF_IN}:{bad_line}: "), st
    now = (sas(c), policies(c), snapshot(net, net.a))
    assert now[:2] == state[:2], "the SAD or SPD changed"
    assert now[2] == state[2], snapshot_diff(state[2], now[2])
    tcp_transfer_check(*tcp_transfer_start(net, net.a, net.b, B4, 5804, nbytes=300_000), 300_000)

    # The journal has the messages without tunsec's own timestamps.
    assert not re.search(r"^\d{4}-\d\d-\d\dT", c.journal(), re.M), c.journal()[:2000]

    # The sandbox as systemd scores it.
    sec = c.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", sec)
    assert m, sec
    print(f"systemd-analyze security {UNIT}: {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= 3.0, sec

    # Stop: the namespace as it was.
    c.run("systemctl", "stop", UNIT)
    st = c.show("ActiveState", "Result")
    assert st == {"ActiveState": "inactive", "Result": "success"}, st
    journal = c.journal()
    assert "final counters" in journal and "tunsec down: routes, rules and nftables restored" in journal, journal
    after = snapshot(net, net.a)
    assert after == net.before, snapshot_diff(net.before, after)
    db.stop()
    # Nothing went wrong but the broken file's reload (priority err) and
    # the arena beyond RLIMIT_MEMLOCK (a warning, in a container without
    # CAP_SYS_RESOURCE).
    warnings = [ln for ln in c.journal("-p", "warning").splitlines() if not ln.startswith("reload failed")]
    print(f"warnings in the journal of {UNIT}: {warnings or 'none'}")
    assert not [w for w in warnings if "seccomp" in w or "CAP_SETPCAP" in w], warnings
