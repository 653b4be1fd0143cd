"""The daemon's heap in transparent huge pages: `tunsec run` starts itself
again (same PID, so a supervisor's idea of the process holds) with glibc's
`glibc.malloc.hugetlb=1` tunable, which glibc reads only at start, and says
so; TUNSEC_HUGEPAGES=0 keeps 4 KiB pages, and tunables already set are
kept. Either way it carries traffic."""

from pathlib import Path

import pytest

from e2elib import B4, make_topology, mkconf, tcp_transfer_check, tcp_transfer_start

SAID = "heap in transparent huge pages (glibc.malloc.hugetlb=1)"


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "hp")
    topo.conf = mkconf("gcm", topo.workdir / "conf")
    return topo


def environ(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def thp_available() -> bool:
    t = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return t.exists() and ("[always]" in t.read_text() or "[madvise]" in t.read_text())


def test_the_daemon_starts_again_with_huge_pages_or_not_if_asked(net):
    if not thp_available():
        pytest.skip("the kernel has no transparent huge pages to give")
    da = net.daemon(net.a, net.conf[0]).start()
    db = net.daemon(net.b, net.conf[1], env={"TUNSEC_HUGEPAGES": "0"}).start()
    # The PID the harness started is the daemon (exec, not a child).
    assert da.alive() and "/tunsec" in Path(f"/proc/{da.pid}/exe").resolve().as_posix()
    # Its name is still tunsec (ps, pgrep, systemd), not that of the path
    # it started itself again by.
    assert Path(f"/proc/{da.pid}/comm").read_text().strip() == "tunsec"
    assert environ(da.pid).get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1"
    assert SAID in da.log(), da.log()
    assert "GLIBC_TUNABLES" not in environ(db.pid) and SAID not in db.log(), db.log()
    tcp_transfer_check(*tcp_transfer_start(net, net.a, net.b, B4, 6601, 2_000_000), 2_000_000)
    da.stop()
    db.stop()


def test_a_tunable_already_set_is_kept(net):
    if not thp_available():
        pytest.skip("the kernel has no transparent huge pages to give")
    # (glibc rewrites the variable in place as it reads it: what
    # /proc/PID/environ shows then is not what was passed.)
    da = net.daemon(net.a, net.conf[0], env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}).start()
    assert environ(da.pid).get("GLIBC_TUNABLES", "").startswith("glibc.malloc.arena_max=2")
    assert environ(da.pid).get("TUNSEC_HUGEPAGES") == "set"
    assert SAID in da.log(), da.log()
    da.stop()
