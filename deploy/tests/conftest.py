"""Shared helpers of the deployment tests (run by scripts/test with the venv's pytest)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="session")
def kvrouter_bin() -> str:
    """The `kvrouter` binary under test (scripts/test builds it and sets KVROUTER_BIN)."""
    path = os.environ.get("KVROUTER_BIN") or str(ROOT / "target" / "debug" / "kvrouter")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no kvrouter binary at {path}: build it (cargo build -p kvrouter) or set KVROUTER_BIN")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_for(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0,
             status: int = 200) -> bytes:
    """Polls `url` until it answers `status`; fails if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    last = 0
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {url} answered")
        last, body = http_get(url)
        if last == status:
            return body
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer {status} within {timeout}s (last: {last})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
