"""What tunsec does not do, met by an unmodified charon (issue 8): marks
on SAs and policies (`mark_in`/`mark_out`) and tunnel mode are refused with
the errno the kernel would give, charon says so in its log and gives up the
CHILD_SA cleanly, and tunsec's SAD and SPD are left as they were. (UDP
encapsulation, refused before, is served now: test_e2e_ike_charon.py.)"""

import re
import subprocess

import pytest

from charon import Charon, available
from e2elib import A4, B4, make_topology, tunsec_bin

pytestmark = pytest.mark.skipif(not available(), reason="strongswan-charon and strongswan-swanctl are not installed")


def conns(local, remote, me, peer):
    # A second IKE connection, told apart by its identities, whose child
    # marks its SAs and policies (XFRMA_MARK).
    return f"""natt {{ version = 2
  local_addrs = {local}
  remote_addrs = {remote}
  proposals = aes128-sha256-modp2048
  local {{ auth = psk
          id = natt-{me} }}
  remote {{ auth = psk
           id = natt-{peer} }}
  children {{ marked {{ local_ts = {local}/32
                   remote_ts = {remote}/32
                   mode = transport
                   mark_in = 0x2a
                   mark_out = 0x2a
                   esp_proposals = aes128gcm16 }} }} }}"""


SECRETS = """ike-2 { id-1 = natt-a
          id-2 = natt-b
          secret = "another test secret" }"""


TUNNEL = """   tun {{ local_ts = {l}/32
     remote_ts = {r}/32
     mode = tunnel
     esp_proposals = aes128gcm16 }}"""


@pytest.fixture(scope="module")
def net(request, tmp_path_factory):
    topo = make_topology(request, tmp_path_factory, "R")
    topo.da = topo.daemon(topo.a, None, xfrm=True).start()
    topo.db = topo.daemon(topo.b, None, xfrm=True).start()
    topo.ca = Charon(topo, topo.a, topo.da.xfrm, A4, B4, TUNNEL.format(l=A4, r=B4), "a", conns(A4, B4, "a", "b"), SECRETS)
    topo.cb = Charon(topo, topo.b, topo.db.xfrm, B4, A4, TUNNEL.format(l=B4, r=A4), "b", conns(B4, A4, "b", "a"), SECRETS)
    topo.ca.load()
    topo.cb.load()
    yield topo


def dump(d, flag):
    return subprocess.run([str(tunsec_bin()), "setkey", "--control", str(d.control), flag], capture_output=True,
                          text=True, timeout=30).stdout


def refusal(net, child, tunsec_says, charon_says):
    out = net.ca.swanctl("--initiate", "--child", child, "--timeout", "20", timeout=30, check=False)
    assert "initiate completed successfully" not in out, out
    logs = net.da.log() + net.db.log()
    assert re.search(tunsec_says, logs), logs[-2000:]
    lines = [l for c in (net.ca, net.cb) for _, l in c.events(charon_says)]
    assert lines, net.cb.logtext()[-3000:]
    for l in sorted(set(lines)):
        print(f"charon: {l}")
    for d in (net.da, net.db):
        assert "spi=" not in dump(d, "-D"), dump(d, "-D")
        assert dump(d, "-DP").strip() == "", dump(d, "-DP")


def test_marks_are_refused_cleanly(net):
    refusal(net, "marked", r"xfrm: refused .*errno 95.*marks",
            r"received netlink error: Operation not supported|unable to (add|install)")


def test_tunnel_mode_is_refused_cleanly(net):
    refusal(net, "tun", r"xfrm: refused .*(errno 93|errno 95).*transport mode only",
            r"received netlink error: (Protocol not supported|Operation not supported)|unable to (add|install)")
