"""pytest configuration for the tunsec end-to-end suite.

Two network namespaces joined by a veth pair (netns/up.sh), `tunsec run` in
each, real traffic between them. Needs root (namespaces, TUN, nftables,
raw sockets) and ip, nft, tcpdump, tshark and ping. The binary under test
is $TUNSEC_BIN, default target/release/tunsec (`cargo build --release`).
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2elib  # noqa: E402

TOOLS = ["ip", "nft", "tcpdump", "tshark", "ping"]


def pytest_report_header(config):
    return f"tunsec binary: {e2elib.tunsec_bin()}"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="the e2e suite needs root (network namespaces, TUN devices, nftables)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _prerequisites():
    if os.geteuid() != 0:
        return
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the e2e suite needs {', '.join(missing)}")
    p = e2elib.tunsec_bin()
    if not p.is_file():
        pytest.fail(f"tunsec binary not found at {p}: run `cargo build --release` or set TUNSEC_BIN")

