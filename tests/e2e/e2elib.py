"""Helpers for the tunsec end-to-end suite: two network namespaces joined by
a veth pair (netns/up.sh), a `tunsec run` daemon in each, traffic from
nettool.py, captures with tcpdump, dissection with tcpdump and tshark.

Everything a test starts is registered with its Topology, which kills it
and deletes the namespaces at teardown (netns/down.sh), pass or fail.
Traffic only ever flows between the two namespaces' addresses.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
NETNS = REPO_ROOT / "netns"
NETTOOL = HERE / "nettool.py"
PY = sys.executable

A4, B4 = "10.77.0.1", "10.77.0.2"
A6, B6 = "fd77::1", "fd77::2"
IFACE_A, IFACE_B = "tsa0", "tsb0"
TUN = "tsec0"

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
PROTO_ESP, PROTO_AH, PROTO_ICMPV6, PROTO_IPCOMP = 50, 51, 58, 108

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tunsec_bin() -> Path:
    """The binary under test: $TUNSEC_BIN, default target/release/tunsec
    (relative paths are taken from the repository root)."""
    p = Path(os.environ.get("TUNSEC_BIN", "target/release/tunsec"))
    if not p.is_absolute():
        p = REPO_ROOT / p
    return p


def ns_names(tag: str) -> tuple[str, str]:
    """Namespace names of one test module: e2eA<tag>, e2eB<tag> (the prefix
    is $TUNSEC_E2E_PREFIX, default e2e)."""
    prefix = os.environ.get("TUNSEC_E2E_PREFIX", "e2e")
    return f"{prefix}A{tag}", f"{prefix}B{tag}"


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


class Proc:
    """A process in a namespace. stdout is a pipe (nettool prints READY and
    one JSON line), stderr goes to a file."""

    def __init__(self, ns: str, argv: list[str], logdir: Path, name: str, env: dict | None = None,
                 stdout_file: bool = False):
        self.ns = ns
        self.argv = argv
        self.name = name
        self.err_path = logdir / f"{name}.stderr"
        self._err = open(self.err_path, "wb")
        self.out_path = logdir / f"{name}.stdout" if stdout_file else None
        self._out = open(self.out_path, "wb") if stdout_file else None
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=self._out or subprocess.PIPE,
                                  stderr=self._err, env=full_env)
        self._buf = b""
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return ANSI.sub("", self.err_path.read_text(errors="replace"))

    def _read_lines(self, timeout: float) -> bool:
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            return True
        chunk = os.read(self.p.stdout.fileno(), 65536)
        if not chunk:
            return False
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.lines.append(line.decode(errors="replace"))
        return True

    def wait_ready(self, timeout: float = 15) -> None:
        end = time.monotonic() + timeout
        while "READY" not in self.lines:
            if time.monotonic() > end:
                raise AssertionError(f"{self.name}: not ready after {timeout}s; stderr:\n{self.stderr()}")
            if not self._read_lines(0.1):
                self.p.wait()
                raise AssertionError(f"{self.name} exited {self.p.returncode} before READY; stderr:\n{self.stderr()}")

    def result(self, timeout: float = 120) -> dict:
        """Wait for exit; the last stdout line as JSON."""
        end = time.monotonic() + timeout
        while self._read_lines(max(0.0, min(0.5, end - time.monotonic()))):
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"{self.name}: still running after {timeout}s; stderr:\n{self.stderr()}")
        self.p.wait(timeout=10)
        if self._buf:
            self.lines.append(self._buf.decode(errors="replace"))
            self._buf = b""
        assert self.p.returncode == 0, f"{self.name} exited {self.p.returncode}; stderr:\n{self.stderr()}"
        js = [ln for ln in self.lines if ln.startswith("{")]
        assert js, f"{self.name}: no JSON output; stdout {self.lines}; stderr:\n{self.stderr()}"
        return json.loads(js[-1])

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def kill(self) -> None:
        if self.alive():
            try:
                self.p.terminate()
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=5)
        self._err.close()
        if self._out:
            self._out.close()


# --------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------


class Topology:
    """Namespaces a (host A, 10.77.0.1 / fd77::1) and b (host B) built by
    netns/up.sh; teardown kills what was started and runs netns/down.sh."""

    def __init__(self, tag: str, workdir: Path):
        self.a, self.b = ns_names(tag)
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.daemons: list[Daemon] = []
        self._n = 0

    @property
    def env(self) -> dict:
        return {**os.environ, "NS_A": self.a, "NS_B": self.b}

    def up(self) -> None:
        r = subprocess.run([str(NETNS / "up.sh")], env=self.env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"netns/up.sh failed: {r.stdout}{r.stderr}"
        # No address may still be tentative (the state must be settled
        # before tests compare snapshots of it).
        end = time.monotonic() + 10
        while any(self.run(ns, "ip", "-6", "addr", "show", "tentative").stdout.strip() for ns in (self.a, self.b)):
            assert time.monotonic() < end, "IPv6 addresses still tentative after 10 s"
            time.sleep(0.1)
        # Resolve the neighbours both ways (plain ICMP, no daemon yet): a
        # fresh veth may lose the first neighbour solicitation, and packets
        # would then wait a second for the retry.
        for ns, dsts in ((self.a, (B4, B6)), (self.b, (A4, A6))):
            for dst in dsts:
                r = self.run(ns, "ping", "-n", "-c", "1", "-W", "5", dst, check=False, timeout=30)
                assert r.returncode == 0, f"{ns} cannot reach {dst} before any daemon runs:\n{r.stdout}{r.stderr}"

    def down(self) -> None:
        for d in self.daemons:
            d.kill()
        for p in self.procs:
            p.kill()
        subprocess.run([str(NETNS / "down.sh")], env=self.env, capture_output=True, timeout=60)

    def ns(self, side: str) -> str:
        return {"a": self.a, "b": self.b}[side]

    def run(self, ns: str, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{' '.join(argv)} in {ns} exited {r.returncode}:\n{r.stdout}{r.stderr}"
        return r

    def spawn(self, ns: str, argv: list[str], name: str, **kw) -> Proc:
        self._n += 1
        p = Proc(ns, argv, self.workdir, f"{self._n:03d}-{name}", **kw)
        self.procs.append(p)
        return p

    def tool(self, ns: str, *args: str, name: str | None = None) -> Proc:
        return self.spawn(ns, [PY, str(NETTOOL), *args], name or args[0])

    def mac(self, ns: str, iface: str) -> str:
        return self.run(ns, "cat", f"/sys/class/net/{iface}/address").stdout.strip()

    def daemon(self, ns: str, config: Path | None, tun: str = TUN, control: Path | None = None,
               xfrm: bool = False, env: dict | None = None) -> "Daemon":
        """A tunsec daemon; with `xfrm`, serving XFRM netlink at
        WORKDIR/NS-TUN.xfrm (Daemon.xfrm); `env` adds to its environment."""
        d = Daemon(self, ns, config, tun, control or self.workdir / f"{ns}-{tun}.sock",
                   self.workdir / f"{ns}-{tun}.xfrm" if xfrm else None, env)
        self.daemons.append(d)
        return d


def make_topology(request, tmp_path_factory, tag: str) -> Topology:
    """A module's namespaces (e2eA<tag>, e2eB<tag>), always torn down (the
    finalizer is registered before anything is built)."""
    topo = Topology(tag, tmp_path_factory.mktemp(f"e2e{tag}"))
    request.addfinalizer(topo.down)
    topo.up()
    return topo


def mkconf(scenario: str, outdir: Path) -> tuple[Path, Path]:
    """netns/mkconf.sh SCENARIO DIR: fresh keys for both hosts."""
    outdir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(NETNS / "mkconf.sh"), scenario, str(outdir)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"netns/mkconf.sh {scenario} failed: {r.stderr}"
    return outdir / "a.conf", outdir / "b.conf"


@dataclass
class SA:
    src: str
    dst: str
    proto: str
    spi: int
    enc: str | None = None
    enc_key: str = ""
    auth: str | None = None
    auth_key: str = ""


# esp-udp SAs (ESP in UDP) count as esp; their [port]s are dropped.
SA_RE = re.compile(r"^add\s+([^\s\[]+)(?:\[\d+\])?\s+([^\s\[]+)(?:\[\d+\])?\s+(esp|ah|ipcomp)(?:-udp)?\s+"
                   r"(0x[0-9a-fA-F]+|\d+)\b(.*?);", re.M)


def parse_sas(conf: Path) -> list[SA]:
    """The SAs of a setkey file as mkconf.sh writes them."""
    sas = []
    for m in SA_RE.finditer(conf.read_text()):
        rest = m.group(5)
        e = re.search(r"-E\s+(\S+)\s+(0x[0-9a-fA-F]+)", rest)
        a = re.search(r"-A\s+(\S+)\s+(0x[0-9a-fA-F]+)", rest)
        sas.append(SA(m.group(1), m.group(2), m.group(3), int(m.group(4), 0),
                      e.group(1) if e else None, e.group(2) if e else "",
                      a.group(1) if a else None, a.group(2) if a else ""))
    assert sas, f"no SAs in {conf}"
    return sas


def find_sa(sas: list[SA], src: str, dst: str, proto: str) -> SA:
    found = [s for s in sas if s.src == src and s.dst == dst and s.proto == proto]
    assert len(found) == 1, f"{proto} SA {src} -> {dst}: {found}"
    return found[0]


# --------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------

COUNTERS_RE = re.compile(
    r"out (?P<out_packets>\d+) packets (?P<out_bytes>\d+) bytes, in (?P<in_packets>\d+) packets (?P<in_bytes>\d+) bytes, "
    r"bypassed (?P<bypassed>\d+), tun rx (?P<tun_rx>\d+) tx (?P<tun_tx>\d+) \(errors (?P<tun_tx_errors>\d+)\), "
    r"net rx (?P<net_rx>\d+) tx (?P<net_tx>\d+) \(errors (?P<net_tx_errors>\d+)\), dropped (?P<dropped>\d+)"
    r"(?: \((?P<reasons>[^)]*)\))?"
)
COUNTERS_LINE = re.compile(r"^.*?\b(final )?counters: (.*)$", re.M)


def drop_reasons() -> frozenset[str]:
    """The engine's drop reasons, as it names them (DropReason::name in
    src/engine/mod.rs), so that a renamed or removed reason fails the tests
    that ask for it instead of reading as 0."""
    text = (REPO_ROOT / "src" / "engine" / "mod.rs").read_text()
    body = text[text.index("pub fn name(self) -> &'static str"):]
    body = body[:body.index("\n    }\n")]
    names = frozenset(re.findall(r'DropReason::\w+ => "([a-z0-9-]+)"', body))
    assert len(names) >= 10, f"cannot read the drop reasons from src/engine/mod.rs: {sorted(names)}"
    return names


DROP_REASONS = drop_reasons()


@dataclass
class Counters:
    line: str
    values: dict[str, int]
    reasons: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, k: str) -> int:
        """A total (`dropped`, `in_packets`, ...) or a drop reason's count.
        The line names only the reasons that dropped something, so a known
        reason it does not name is 0; a name tunsec does not have raises."""
        if k in self.values:
            return self.values[k]
        if k not in DROP_REASONS:
            raise KeyError(f"{k!r} is neither a counter ({', '.join(self.values)}) nor a drop reason "
                           f"({', '.join(sorted(DROP_REASONS))})")
        return self.reasons.get(k, 0)


def parse_counters(line: str) -> Counters:
    m = COUNTERS_RE.search(line)
    assert m, f"unparsable counters line: {line!r}"
    vals = {k: int(v) for k, v in m.groupdict().items() if k != "reasons"}
    reasons = {}
    if m.group("reasons"):
        for part in m.group("reasons").split(", "):
            name, n = part.rsplit(" ", 1)
            reasons[name] = int(n)
    assert sum(reasons.values()) == vals["dropped"], f"drop reasons do not add up: {line}"
    unknown = set(reasons) - DROP_REASONS
    assert not unknown, f"drop reasons {sorted(unknown)} are not the engine's ({sorted(DROP_REASONS)}): {line}"
    return Counters(line, vals, reasons)


class Daemon:
    """`ip netns exec NS tunsec run --config C --tun T --control S`, logging
    to a file (RUST_LOG=info, no colours)."""

    def __init__(self, topo: Topology, ns: str, config: Path | None, tun: str, control: Path,
                 xfrm: Path | None = None, env: dict | None = None):
        self.topo, self.ns, self.config, self.tun, self.control = topo, ns, config, tun, control
        self.xfrm = xfrm
        self.env = env or {}
        self.p: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def argv(self, *extra: str) -> list[str]:
        config = ["--config", str(self.config)] if self.config else []
        xfrm = ["--xfrm", str(self.xfrm)] if self.xfrm else []
        return [str(tunsec_bin()), "run", *config, "--tun", self.tun, "--control", str(self.control), *xfrm,
                *extra]

    def start(self, timeout: float = 15) -> "Daemon":
        assert self.p is None or self.p.poll() is not None, "already running"
        self.starts += 1
        self.log_path = self.topo.workdir / f"tunsec-{self.ns}-{self.tun}-{self.starts}.log"
        log = open(self.log_path, "wb")
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1", **self.env}
        self.p = subprocess.Popen(["ip", "netns", "exec", self.ns, *self.argv()], stdout=log, stderr=subprocess.STDOUT,
                                  env=env)
        log.close()
        end = time.monotonic() + timeout
        while " up: " not in self.log():
            if self.p.poll() is not None:
                raise AssertionError(f"tunsec in {self.ns} exited {self.p.returncode} at start:\n{self.log()}")
            if time.monotonic() > end:
                raise AssertionError(f"tunsec in {self.ns} not up after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return ANSI.sub("", self.log_path.read_text(errors="replace"))

    def rss_kib(self) -> int:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text(), re.M)
        assert m
        return int(m.group(1))

    def memory_kib(self) -> dict[str, int]:
        """`rss`, and `heap`: the size of the private writable anonymous
        mappings but thread stacks (a writable mapping right above a
        guard page: the control socket starts a thread per client, and
        glibc keeps the stacks of finished threads for the next ones) and
        the key arena's 16 GiB reservation (MAP_NORESERVE); that is the
        allocator's arenas and large blocks and the key arena's locked
        part. What malloc took from the kernel grows only with what it
        holds or cannot reuse: a leak shows here, while RSS also grows as
        pages of blocks allocated long ago are first written (the
        workers' packet buffers)."""
        heap = 0
        prev = None  # (end, perms, size) of the mapping before
        for line in Path(f"/proc/{self.pid}/maps").read_text().splitlines():
            f = line.split()
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            anon = f[4] == "0" and (len(f) < 6 or f[5] == "[heap]")
            stack = prev is not None and prev[0] == lo and prev[1] == "---p" and prev[2] <= 64 << 10
            if f[1] == "rw-p" and anon and not stack and hi - lo < 1 << 30:
                heap += (hi - lo) >> 10
            prev = (hi, f[1], hi - lo)
        return {"rss": self.rss_kib(), "heap": heap}

    def _counter_lines(self, final: bool) -> list[str]:
        return [m.group(2) for m in COUNTERS_LINE.finditer(self.log()) if bool(m.group(1)) == final]

    def counters(self, settle: float = 0.8, timeout: float = 5) -> Counters:
        """SIGUSR1 and the `counters:` line it logs. Workers publish their
        counters twice a second, hence the settling time first."""
        assert self.alive(), f"tunsec in {self.ns} is not running:\n{self.log()}"
        time.sleep(settle)
        n = len(self._counter_lines(False))
        os.kill(self.pid, signal.SIGUSR1)
        end = time.monotonic() + timeout
        while len(self._counter_lines(False)) <= n:
            assert time.monotonic() < end, f"no counters line after SIGUSR1:\n{self.log()}"
            time.sleep(0.05)
        return parse_counters(self._counter_lines(False)[-1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> Counters:
        """Stop with `sig`; assert a clean exit; the `final counters`."""
        assert self.alive(), f"tunsec in {self.ns} is not running:\n{self.log()}"
        os.kill(self.pid, sig)
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"tunsec in {self.ns} did not stop within {timeout}s:\n{self.log()}")
        log = self.log()
        assert rc == 0, f"tunsec in {self.ns} exited {rc}:\n{log}"
        finals = self._counter_lines(True)
        assert len(finals) == 1, f"expected one `final counters` line:\n{log}"
        return parse_counters(finals[0])

    def kill(self) -> None:
        if self.alive():
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


# --------------------------------------------------------------------------
# State of a namespace
# --------------------------------------------------------------------------

SNAPSHOT_CMDS = {
    "routes": ["ip", "route", "show", "table", "all"],
    "routes6": ["ip", "-6", "route", "show", "table", "all"],
    "rules": ["ip", "rule"],
    "rules6": ["ip", "-6", "rule"],
    "nft": ["nft", "list", "ruleset"],
    "links": ["sh", "-c", "ls /sys/class/net | sort"],
}


def snapshot(topo: Topology, ns: str) -> dict[str, str]:
    return {k: topo.run(ns, *cmd).stdout for k, cmd in SNAPSHOT_CMDS.items()}


def snapshot_diff(before: dict[str, str], after: dict[str, str]) -> str:
    import difflib
    out = []
    for k in before:
        if before[k] != after[k]:
            out.append(f"--- {k}\n" + "".join(difflib.unified_diff(before[k].splitlines(True),
                                                                   after[k].splitlines(True))))
    return "\n".join(out)


# --------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------


def tcp_transfer_start(topo: Topology, src_ns: str, dst_ns: str, dst_addr: str, port: int, nbytes: int = 0,
                       text: bool = False, marker: str = "", duration: float | None = None, rate: float = 0,
                       timeout: float = 120):
    """Start a receiver in dst_ns and a sender in src_ns; returns both."""
    rx = topo.tool(dst_ns, "tcp-recv", "--bind", dst_addr, "--port", str(port), "--timeout", str(timeout),
                   name=f"tcp-recv-{port}")
    rx.wait_ready()
    args = ["tcp-send", "--to", dst_addr, "--port", str(port), "--timeout", str(timeout)]
    if duration is not None:
        args += ["--duration", str(duration)]
    else:
        args += ["--bytes", str(nbytes)]
    if text:
        args.append("--text")
    if marker:
        args += ["--marker", marker]
    if rate:
        args += ["--rate", str(rate)]
    tx = topo.tool(src_ns, *args, name=f"tcp-send-{port}")
    return tx, rx


def tcp_transfer_check(tx: Proc, rx: Proc, nbytes: int | None, timeout: float = 120) -> dict:
    s = tx.result(timeout)
    r = rx.result(timeout)
    if nbytes is not None:
        assert s["bytes"] == nbytes, s
    assert r["bytes"] == s["bytes"], f"received {r['bytes']} bytes of {s['bytes']}"
    assert r["sha256"] == s["sha256"], f"sha256 differs: sent {s['sha256']}, received {r['sha256']}"
    return {"sent": s, "received": r}


def ping(topo: Topology, ns: str, dst: str, count: int = 3, interval: float = 0.2) -> str:
    r = topo.run(ns, "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", dst, check=False, timeout=30)
    assert f"{count} packets transmitted, {count} received" in r.stdout, f"ping {dst} from {ns}:\n{r.stdout}{r.stderr}"
    return r.stdout


# --------------------------------------------------------------------------
# Captures
# --------------------------------------------------------------------------


class Capture:
    """tcpdump -w (classic pcap, full snaplen) on an interface of a namespace;
    `count` packets at most, those `expr` (a pcap filter) selects."""

    def __init__(self, topo: Topology, ns: str, iface: str, path: Path, count: int | None = None,
                 expr: str | None = None):
        self.path = path
        argv = ["tcpdump", "-i", iface, "-n", "-s", "65535", "-U", "--immediate-mode", "-B", "32768", "-w", str(path)]
        if count:
            argv += ["-c", str(count)]
        if expr:
            argv.append(expr)
        self.proc = topo.spawn(ns, argv, f"tcpdump-{iface}")
        end = time.monotonic() + 10
        while "listening on" not in self.proc.stderr():
            assert self.proc.alive(), f"tcpdump failed: {self.proc.stderr()}"
            assert time.monotonic() < end, f"tcpdump did not start: {self.proc.stderr()}"
            time.sleep(0.05)

    def stop(self) -> str:
        time.sleep(0.3)
        self.proc.signal(signal.SIGINT)
        try:
            self.proc.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.proc.stderr()


def read_pcap(path: Path) -> tuple[int, list[bytes]]:
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        e = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        e = ">"
    else:
        raise AssertionError(f"{path}: not a classic pcap file (magic {magic.hex()})")
    _vmaj, _vmin, _tz, _sig, snaplen, linktype = struct.unpack(e + "HHiIII", data[4:24])
    assert snaplen >= 65535, f"{path}: snaplen {snaplen}"
    off = 24
    frames = []
    while off + 16 <= len(data):
        _s, _u, incl, orig = struct.unpack(e + "IIII", data[off:off + 16])
        off += 16
        assert incl == orig, f"{path}: a frame was cut by the snaplen ({incl} of {orig})"
        frames.append(data[off:off + incl])
        off += incl
    return linktype, frames


def write_pcap(path: Path, frames: list[bytes], linktype: int = 1) -> Path:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype))
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", i, 0, len(fr), len(fr)))
            f.write(fr)
    return path


@dataclass
class Pkt:
    frame: bytes
    ip: bytes
    off: int  # offset of the IP header in frame
    version: int
    src: str
    dst: str
    proto: int  # IPv4 protocol / IPv6 first next header
    l4: int  # offset of the first header after IP (in ip)

    @property
    def payload(self) -> bytes:
        return self.ip[self.l4:]


def ip_packets(path: Path) -> list[Pkt]:
    """The IPv4/IPv6 packets of an Ethernet capture."""
    linktype, frames = read_pcap(path)
    assert linktype == 1, f"{path}: link type {linktype}"
    out = []
    for fr in frames:
        et = struct.unpack("!H", fr[12:14])[0]
        ip = fr[14:]
        if et == 0x0800 and len(ip) >= 20:
            out.append(Pkt(fr, ip, 14, 4, socket.inet_ntop(socket.AF_INET, ip[12:16]),
                           socket.inet_ntop(socket.AF_INET, ip[16:20]), ip[9], (ip[0] & 0xF) * 4))
        elif et == 0x86DD and len(ip) >= 40:
            out.append(Pkt(fr, ip, 14, 6, socket.inet_ntop(socket.AF_INET6, ip[8:24]),
                           socket.inet_ntop(socket.AF_INET6, ip[24:40]), ip[6], 40))
    return out


def between(pkts: list[Pkt], x: str, y: str) -> list[Pkt]:
    """Packets from x to y or from y to x."""
    return [p for p in pkts if {p.src, p.dst} == {x, y}]


# --------------------------------------------------------------------------
# Dissectors
# --------------------------------------------------------------------------

TSHARK_ENC = {"aes-cbc": "AES-CBC [RFC3602]", "aes-gcm-16": "AES-GCM with 16 octet ICV [RFC4106]"}
TSHARK_AUTH = {"hmac-sha1": "HMAC-SHA-1-96 [RFC2404]", "hmac-sha256": "HMAC-SHA-256-128 [RFC4868]", None: "NULL"}


def tshark_uat(sa: SA) -> str:
    fam = "IPv6" if ":" in sa.src else "IPv4"
    aead = sa.enc == "aes-gcm-16"
    vals = [fam, sa.src, sa.dst, f"0x{sa.spi:08x}", TSHARK_ENC[sa.enc], sa.enc_key,
            TSHARK_AUTH[None if aead else sa.auth], "" if aead else sa.auth_key]
    return "uat:esp_sa:" + ",".join(f'"{v}"' for v in vals)


def tshark_esp(pcap: Path, sas: list[SA], fields: list[str]) -> list[dict[str, str]]:
    """One dict per ESP packet: the fields, with tshark decrypting ESP and
    checking its ICV with the keys of `sas` (as tests/interop/test_tshark.py)."""
    cmd = ["tshark", "-n", "-r", str(pcap),
           "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE"]
    for sa in sas:
        if sa.proto == "esp":
            cmd += ["-o", tshark_uat(sa)]
    # Inner dissectors off: an exception there would hide the ICV verdict.
    cmd += ["--disable-protocol", "tcp", "--disable-protocol", "udp", "--disable-protocol", "icmp",
            "--disable-protocol", "icmpv6", "--disable-protocol", "ipcomp"]
    cmd += ["-Y", "esp", "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in fields:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"tshark failed: {proc.stderr}"
    return [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines()]


def tcpdump_read(pcap: Path, *flags: str) -> str:
    proc = subprocess.run(["tcpdump", "-n", *flags, "-r", str(pcap)], capture_output=True, timeout=120)
    assert proc.returncode == 0, f"tcpdump failed: {proc.stderr.decode(errors='replace')}"
    return proc.stdout.decode("latin-1")


# The seed's tcpdump line (tcpdump >= 4.99 adds the AH ICV), e.g.
#   IP6 fd77::1 > fd77::2: AH(spi=0x303bfcdc,seq=0x29e6): ESP(spi=0xadb71052,seq=0x29e6), length 116
AH_ESP_LINE = re.compile(
    r" (?P<ip>IP6?) (?P<src>[0-9a-f.:]+) > (?P<dst>[0-9a-f.:]+): "
    r"AH\(spi=0x(?P<ahspi>[0-9a-f]{8}),seq=0x(?P<ahseq>[0-9a-f]+)(?:,icv=0x(?P<icv>[0-9a-f]+))?\): "
    r"ESP\(spi=0x(?P<espspi>[0-9a-f]{8}),seq=0x(?P<espseq>[0-9a-f]+)\), length (?P<len>\d+)"
)


def nft_drop_counters(topo: Topology, ns: str, tun: str = TUN) -> dict[str, int]:
    """Packets counted by each `counter drop` rule of tunsec's table, keyed
    by the rule's match text (e.g. `ip saddr 10.77.0.1 ip daddr 10.77.0.2`)."""
    text = topo.run(ns, "nft", "list", "table", "inet", f"tunsec_{tun}").stdout
    out = {}
    for line in text.splitlines():
        m = re.search(r"(ip6? saddr \S+ ip6? daddr \S+).*counter packets (\d+) bytes \d+ drop", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    # Host-to-host policies that refuse are elements of the sets of refused
    # pairs (in4_*_drop, in6_*_drop): `SRC . DST counter packets N bytes M`,
    # named as the rule would be.
    for block in re.findall(r"set in[46]_\d+_drop \{(.*?)\n\t\}", text, re.S):
        for m in re.finditer(r"([0-9a-f.:]+) \. ([0-9a-f.:]+) counter packets (\d+) bytes \d+", block):
            f = "ip6" if ":" in m.group(1) else "ip"
            out[f"{f} saddr {m.group(1)} {f} daddr {m.group(2)}"] = int(m.group(3))
    return out


def tcp_snmp(topo: Topology, ns: str) -> dict[str, int]:
    """The Tcp line of /proc/net/snmp in a namespace (covers IPv4 and IPv6)."""
    text = topo.run(ns, "cat", "/proc/net/snmp").stdout
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("Tcp:")]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}
