"""Throughput between two network namespaces over a veth pair, every
scenario in one run: plaintext, tunsec (bypass, ESP, ESP in UDP, bundles)
and strongSwan's libipsec, the userspace IPsec it is measured against.

Run by scripts/bench-netns.sh (which builds tunsec and finds the venv):

    scripts/bench-netns.sh [--secs 5] [--runs 3] [--only gcm,gcm-udp] [--json F] [--png F]

For each scenario: iperf3 TCP with one stream and with -P 4 (median of
RUNS, with min and max), and UDP 1300-byte datagrams at the highest rate
that loses under 1% (a search); CPU seconds of each side's data plane
(tunsec daemons, or the charons for libipsec) turned into microseconds
per 1400-byte packet of the transfer; ratios to plaintext and to libipsec
in the same run. Only the namespaces' private test addresses are used;
everything is torn down at exit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS_A, NS_B = "tsbenchA", "tsbenchB"
A4, B4 = "10.77.0.1", "10.77.0.2"
CHARON = "/usr/lib/ipsec/charon"
HZ = os.sysconf("SC_CLK_TCK")
# TUNSEC_BIN: another build to measure (the .sh wrapper still builds this tree).
BIN = Path(os.environ.get("TUNSEC_BIN", ROOT / "target/release/tunsec"))

# name: (label, kind, what it is compared with among libipsec's)
SCENARIOS = {
    "plaintext": ("plaintext", "plain", None),
    "bypass": ("tunsec, bypass policy (TUN path, no IPsec)", "tunsec", None),
    "gcm": ("tunsec esp aes-gcm-16", "tunsec", "libipsec-gcm"),
    "gcm-udp": ("tunsec esp-in-udp aes-gcm-16 (GSO)", "tunsec", "libipsec-gcm"),
    "cbc": ("tunsec esp aes-cbc + hmac-sha256", "tunsec", "libipsec-sha256"),
    "windows": ("tunsec seed: esp aes-cbc/sha1 + ah sha1", "tunsec", "libipsec-sha256"),
    "linux": ("tunsec ipcomp + esp aes-cbc/sha256 + ah", "tunsec", "libipsec-sha256"),
    "libipsec-gcm": ("strongSwan libipsec aes128gcm16 (udp, tunnel)", "libipsec", None),
    "libipsec-sha256": ("strongSwan libipsec aes128-sha256 (udp, tunnel)", "libipsec", None),
}


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def nsx(ns, *argv, **kw):
    return sh("ip", "netns", "exec", ns, *argv, **kw)


def ticks(pids):
    t = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            t += int(f[11]) + int(f[12])
        except (OSError, IndexError):
            pass
    return t


class Side:
    """The data-plane processes of one scenario: pids per host."""

    def __init__(self):
        self.procs = []
        self.pids = {"A": [], "B": []}

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def start_tunsec(sc, tmp) -> Side:
    conf = tmp / sc
    if sc == "bypass":
        conf.mkdir()
        for side, me, peer in (("a", A4, B4), ("b", B4, A4)):
            # TCP is bypassed; the ICMP ipsec policy makes the peer one
            # tunsec routes, so the TCP goes through the TUN device.
            (conf / f"{side}.conf").write_text(
                f"flush;\nspdflush;\nspdadd {me} {peer} tcp -P out none;\n"
                f"spdadd {me} {peer} icmp -P out ipsec esp/transport//require;\n"
                f"spdadd {peer} {me} any -P in none;\n")
    else:
        sh(str(ROOT / "netns/mkconf.sh"), sc, str(conf), env={**os.environ, "NS_A": NS_A, "NS_B": NS_B})
    s = Side()
    for host, ns, f in (("A", NS_A, "a.conf"), ("B", NS_B, "b.conf")):
        log = open(tmp / f"{sc}.{host}.log", "w")
        p = subprocess.Popen(["ip", "netns", "exec", ns, str(BIN), "run", "-c",
                              str(conf / f), "--tun", "tsec0", "--workers", os.environ.get("WORKERS", "1"),
                              "--control", f"/run/tunsec/{ns}.sock"], stdout=log, stderr=subprocess.STDOUT)
        s.procs.append(p)
        s.pids[host].append(p.pid)
    wait_log(tmp, sc, "up")
    return s


def wait_log(tmp, sc, word, timeout=15):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        logs = [(tmp / f"{sc}.{h}.log").read_text() for h in "AB"]
        if all(word in t for t in logs):
            # Let the neighbours resolve and the plumbing settle.
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise SystemExit(f"{sc}: daemons not up:\n" + "\n".join(logs))


def start_libipsec(sc, tmp) -> Side:
    esp = "aes128gcm16" if sc == "libipsec-gcm" else "aes128-sha256"
    s = Side()
    for host, ns, me, peer in (("A", NS_A, A4, B4), ("B", NS_B, B4, A4)):
        d = tmp / f"{sc}-{host}"
        d.mkdir()
        (d / "strongswan.conf").write_text(f"""charon {{
  load_modular = no
  load = random nonce openssl aes sha1 sha2 hmac gcm pem pkcs1 x509 pubkey curve25519 kdf socket-default kernel-libipsec kernel-netlink vici
  install_virtual_ip = no
  filelog {{ log {{ path = {d}/charon.log
                  default = 1 }} }}
  plugins {{
    kernel-netlink {{ fwmark = !0x2a
                     timeout = 5000 }}
    socket-default {{ fwmark = 0x2a }}
    kernel-libipsec {{ allow_peer_ts = yes }}
    vici {{ socket = unix://{d}/vici }}
  }}
}}
""")
        (d / "swanctl.conf").write_text(f"""connections {{ host {{ version = 2
  local_addrs = {me}
  remote_addrs = {peer}
  encap = yes
  proposals = aes128-sha256-modp2048
  local {{ auth = psk
          id = {me} }}
  remote {{ auth = psk
           id = {peer} }}
  children {{ c {{ mode = tunnel
                 local_ts = {me}/32
                 remote_ts = {peer}/32
                 esp_proposals = {esp} }} }}
}} }}
secrets {{ ike-1 {{ id-1 = {me}
                  id-2 = {peer}
                  secret = "benchmark only" }} }}
""")
        p = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh",
                              "-c", f"mount -t tmpfs -o mode=0755 tmpfs /run && exec {CHARON}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "STRONGSWAN_CONF": str(d / "strongswan.conf")})
        s.procs.append(p)
        end = time.monotonic() + 15
        while not (d / "vici").exists():
            if time.monotonic() > end or p.poll() is not None:
                raise SystemExit(f"{sc}: charon did not start: {(d / 'charon.log').read_text()}")
            time.sleep(0.05)
        sh("swanctl", "--load-all", "--file", str(d / "swanctl.conf"), "--uri", f"unix://{d}/vici")
        # The charon's pid (the unshare'd child exec'd into charon).
        s.pids[host].append(p.pid)
    sh("swanctl", "--initiate", "--child", "c", "--uri", f"unix://{tmp / (sc + '-A')}/vici", timeout=30)
    time.sleep(0.5)
    return s


def iperf_tcp(secs, streams):
    out = nsx(NS_A, "iperf3", "-c", B4, "-p", "5201", "-t", str(secs), "-P", str(streams), "-J",
              timeout=secs + 30).stdout
    d = json.loads(out)
    return d["end"]["sum_received"]["bits_per_second"], d["end"]["sum_received"]["bytes"]


def iperf_udp(secs, rate):
    # 4 MiB socket buffers both ends (iperf3 passes -w to the server): with
    # the default 208 KiB a pacing burst overflows the receiver's buffer and
    # the loss measures the buffer, not the path.
    r = nsx(NS_A, "iperf3", "-c", B4, "-p", "5201", "-u", "-l", "1300", "-w", "4M", "-b", str(int(rate)),
            "-t", str(secs), "-J", timeout=secs + 30, check=False)
    try:
        d = json.loads(r.stdout)["end"]["sum"]
    except (ValueError, KeyError):
        return 0.0, 100.0
    return d["bits_per_second"], d.get("lost_percent", 100.0)


def udp_search(secs):
    """The highest rate losing under 1%: double from 250 Mbit/s while the
    loss stays under 1%, then bisect between the last good and the first
    bad rate (5 steps). Returns the received rate of the best good probe."""
    good, bad, best = 0.0, None, 0.0
    rate = 250e6
    while bad is None and rate <= 64e9:
        got, loss = iperf_udp(secs, rate)
        if loss < 1.0:
            good, best = rate, max(best, got)
            rate *= 2
        else:
            bad = rate
    for _ in range(5 if bad else 0):
        rate = (good + bad) / 2
        got, loss = iperf_udp(secs, rate)
        if loss < 1.0:
            good, best = rate, max(best, got)
        else:
            bad = rate
    return best


def measure(sc, side, args):
    res = {}
    pids = side.pids if side else {"A": [], "B": []}
    for streams in (1, 4):
        runs = []
        for _ in range(args.runs):
            t0 = {h: ticks(pids[h]) for h in "AB"}
            bps, nbytes = iperf_tcp(args.secs, streams)
            cpu = {h: (ticks(pids[h]) - t0[h]) / HZ for h in "AB"}
            pkts = nbytes / 1400
            runs.append({"gbps": bps / 1e9,
                         "cpu_s": cpu,
                         "us_per_packet": {h: (cpu[h] * 1e6 / pkts if pids[h] else None) for h in "AB"}})
        g = [r["gbps"] for r in runs]
        med = sorted(runs, key=lambda r: r["gbps"])[len(runs) // 2]
        res[f"tcp{streams}"] = {"gbps": statistics.median(g), "min": min(g), "max": max(g), "runs": runs,
                                "us_per_packet": med["us_per_packet"]}
    if not args.no_udp:
        res["udp"] = {"gbps": udp_search(min(args.secs, 3)) / 1e9}
    return res


def fmt_us(v):
    return "-" if v is None else f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--no-udp", action="store_true", help="skip the UDP rate search")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    wanted = [s for s in args.only.split(",") if s]
    for s in wanted:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r} (known: {', '.join(SCENARIOS)})")
    if any(SCENARIOS[s][1] == "libipsec" for s in wanted) and not (Path(CHARON).exists() and shutil.which("swanctl")):
        raise SystemExit("libipsec scenarios need strongswan-charon, strongswan-swanctl and libcharon-extra-plugins")
    env = {**os.environ, "NS_A": NS_A, "NS_B": NS_B}
    tmp = Path(tempfile.mkdtemp(prefix="tsbench-"))
    results = {}
    try:
        sh(str(ROOT / "netns/up.sh"), env=env)
        nsx(NS_B, "iperf3", "-s", "-D", "-p", "5201")
        time.sleep(0.3)
        for sc in wanted:
            kind = SCENARIOS[sc][1]
            side = None
            try:
                if kind == "tunsec":
                    side = start_tunsec(sc, tmp)
                elif kind == "libipsec":
                    side = start_libipsec(sc, tmp)
                results[sc] = measure(sc, side, args)
            finally:
                if side:
                    side.stop()
            r = results[sc]
            print(f"  {sc}: x1 {r['tcp1']['gbps']:.2f} Gbit/s, -P4 {r['tcp4']['gbps']:.2f}"
                  + (f", udp {r['udp']['gbps']:.2f}" if "udp" in r else ""), file=sys.stderr, flush=True)
    finally:
        for ns in (NS_A, NS_B):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.5)
        sh(str(ROOT / "netns/down.sh"), env=env, check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    plain = results.get("plaintext")
    rows = []
    head = (f"{'scenario':48} {'TCP x1':>7} {'spread':>11} {'-P 4':>6} {'UDP<1%':>7} {'vs plain':>8} "
            f"{'vs libipsec':>11} {'us/pkt A/B':>11}")
    print(head)
    for sc, r in results.items():
        label, kind, ref = SCENARIOS[sc]
        x1 = r["tcp1"]["gbps"]
        vs_plain = f"{x1 / plain['tcp1']['gbps']:.2f}x" if plain else "-"
        vs_lib = f"{x1 / results[ref]['tcp1']['gbps']:.1f}x" if ref in results else "-"
        us = r["tcp1"]["us_per_packet"]
        r.update({"label": label, "vs_plaintext": x1 / plain["tcp1"]["gbps"] if plain else None,
                  "vs_libipsec": x1 / results[ref]["tcp1"]["gbps"] if ref in results else None})
        udp = f"{r['udp']['gbps']:.2f}" if "udp" in r else "-"
        print(f"{label:48} {x1:7.2f} {r['tcp1']['min']:5.2f}-{r['tcp1']['max']:<5.2f} {r['tcp4']['gbps']:6.2f} "
              f"{udp:>7} {vs_plain:>8} {vs_lib:>11} {fmt_us(us['A']) + '/' + fmt_us(us['B']):>11}")
        rows.append((label, x1, r["tcp4"]["gbps"]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    machine = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Linux {platform.release()}"
    print(f"(Gbit/s; median of {args.runs} runs of {args.secs} s, spread = min-max; us/pkt = CPU microseconds "
          f"of each side's data plane per 1400 bytes moved, TCP x1; {machine}; {when})")
    if args.json:
        args.json.write_text(json.dumps({"date": when, "machine": machine, "secs": args.secs, "runs": args.runs,
                                         "results": results}, indent=1))
    if args.png:
        chart(rows, args.png, f"tunsec between two namespaces, {when} ({machine})")


def chart(rows, path, title):
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r[1] for r in rows], height=0.4, label="TCP x1")
    ax.barh([i - 0.2 for i in y], [r[2] for r in rows], height=0.4, label="TCP -P 4")
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Gbit/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
