"""pytest configuration for the tunsec interop suite.

The binary under test is $TUNSEC_BIN, default target/debug/tunsec relative
to the repository root (build it first: scripts/test.sh does).
"""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402


def pytest_report_header(config):
    return f"tunsec binary: {helpers.tunsec_bin()}"


@pytest.fixture(scope="session")
def tunsec() -> Path:
    p = helpers.tunsec_bin()
    if not p.is_file():
        pytest.fail(f"tunsec binary not found at {p}: run `cargo build` or set TUNSEC_BIN")
    return p


@pytest.fixture
def work(tmp_path: Path, tunsec: Path) -> Path:
    """A scratch directory for configs and pcaps (tunsec must exist)."""
    return tmp_path


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (the interop suite needs it)")
    return path


@pytest.fixture(scope="session")
def tshark() -> str:
    return _need("tshark")


@pytest.fixture(scope="session")
def tcpdump() -> str:
    return _need("tcpdump")


@pytest.fixture(scope="session")
def editcap() -> str:
    return _need("editcap")
