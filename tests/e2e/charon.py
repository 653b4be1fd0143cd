"""strongSwan's charon (Debian's strongswan-charon, unmodified) in a test
namespace, keying a tunsec through `tunsec ike --xfrm`: its own
strongswan.conf (STRONGSWAN_CONF), a private /run (two charons on one
machine), and swanctl over its vici socket."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from e2elib import Topology, tunsec_bin

CHARON = "/usr/lib/ipsec/charon"
NOISE = re.compile(r"^\s*(plugin '.*' failed to load.*|opening directory .* failed.*|.*no (authorities|pools) found.*)$")


def available() -> bool:
    return Path(CHARON).exists() and subprocess.run(["which", "swanctl"], capture_output=True).returncode == 0


class Charon:
    def __init__(self, topo: Topology, ns: str, xfrm: Path, local: str, remote: str, children: str,
                 name: str, extra: str = "", extra_secrets: str = ""):
        """`extra` adds connections (inside `connections`), `extra_secrets`
        secrets."""
        self.topo, self.ns, self.name = topo, ns, name
        self.dir = topo.workdir / f"charon-{name}"
        self.dir.mkdir(exist_ok=True)
        self.log = self.dir / "charon.log"
        self.vici = self.dir / "charon.vici"
        (self.dir / "strongswan.conf").write_text(f"""charon {{
  load_modular = no
  load = random nonce openssl aes sha1 sha2 hmac gcm pem pkcs1 x509 pubkey curve25519 kdf socket-default kernel-netlink vici
  install_virtual_ip = no
  install_routes = no
  filelog {{ log {{ path = {self.log}
                  time_format = %s
                  time_add_ms = yes
                  default = 1
                  knl = 2
                  flush_line = yes }} }}
  plugins {{ kernel-netlink {{ timeout = 5000
                             retries = 2 }}
            vici {{ socket = unix://{self.vici} }} }}
}}
""")
        (self.dir / "swanctl.conf").write_text(f"""connections {{ host {{ version = 2
  local_addrs = {local}
  remote_addrs = {remote}
  proposals = aes128-sha256-modp2048
  local {{ auth = psk
          id = {local} }}
  remote {{ auth = psk
           id = {remote} }}
  children {{
{children}
  }} }}
{extra}
}}
secrets {{ ike-1 {{ id-1 = {local}
                  id-2 = {remote}
                  secret = "a test secret, not a real one" }}
{extra_secrets}
}}
""")
        sh = f"mount -t tmpfs -o mode=0755 tmpfs /run && exec {CHARON}"
        self.proc = topo.spawn(ns, [str(tunsec_bin()), "ike", "--xfrm", str(xfrm), "--", "unshare", "--mount",
                                    "--propagation", "private", "sh", "-c", sh], f"charon-{name}",
                               env={"STRONGSWAN_CONF": str(self.dir / "strongswan.conf")})
        end = time.monotonic() + 15
        while not self.vici.exists():
            assert self.proc.alive(), f"charon {name} exited:\n{self.proc.stderr()}\n{self.logtext()}"
            assert time.monotonic() < end, f"charon {name} has no vici socket:\n{self.logtext()}"
            time.sleep(0.05)

    def events(self, pattern: str) -> list[tuple[float, str]]:
        """Log lines matching `pattern`, with their times (Unix seconds)."""
        out = []
        for line in self.logtext().splitlines():
            m = re.match(r"^(\d+\.\d+) (.*)$", line)
            if m and re.search(pattern, m[2]):
                out.append((float(m[1]), m[2]))
        return out

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def swanctl(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        r = subprocess.run(["swanctl", *args, "--uri", f"unix://{self.vici}"], capture_output=True, text=True,
                           timeout=timeout)
        out = "\n".join(l for l in (r.stdout + r.stderr).splitlines() if not NOISE.match(l))
        if check:
            assert r.returncode == 0, f"swanctl {' '.join(args)} ({self.name}) exited {r.returncode}:\n{out}"
        return out

    def load(self) -> str:
        return self.swanctl("--load-all", "--file", str(self.dir / "swanctl.conf"))

    def initiate(self, child: str) -> str:
        out = self.swanctl("--initiate", "--child", child, "--timeout", "20", timeout=30)
        assert "initiate completed successfully" in out, out
        return out

    def children(self) -> dict[str, list[dict]]:
        """swanctl --list-sas: per child name, its CHILD_SAs with state,
        protocol line and SPIs (hex strings)."""
        out = self.swanctl("--list-sas")
        res: dict[str, list[dict]] = {}
        cur = None
        for line in out.splitlines():
            m = re.match(r"^\s+(\S+): #\d+, reqid (\d+), (\w+), ([\w-]+), (.*)$", line)
            if m:
                cur = {"reqid": int(m[2]), "state": m[3], "mode": m[4], "proto": m[5]}
                res.setdefault(m[1], []).append(cur)
                continue
            m = re.match(r"^\s+(in|out)\s+([0-9a-f]{8})(?:_i|_o)?(?:/([0-9a-f]{4}))?", line)
            if m and cur is not None:
                cur[m[1]] = m[2]
                if m[3]:
                    cur[m[1] + "_cpi"] = m[3]
        return res

    def installed(self, child: str, timeout: float = 10) -> dict:
        """The newest INSTALLED CHILD_SA of `child`, waiting for one while
        a rekey is under way."""
        end = time.monotonic() + timeout
        while True:
            sas = [c for c in self.children().get(child, []) if c["state"] == "INSTALLED"]
            if sas:
                return sas[-1]
            assert time.monotonic() < end, f"no INSTALLED CHILD_SA {child}:\n{self.swanctl('--list-sas')}"
            time.sleep(0.2)
