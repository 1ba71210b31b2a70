"""Mock workers for running the examples by hand: `kvrouter mocker` started as a child process
(the `kvrouter` binary from `$KVROUTER_BIN`, `$PATH`, or the repository's debug build)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
from typing import Any, Dict, Iterator, List


def kvrouter_binary() -> str:
    env = os.environ.get("KVROUTER_BIN")
    if env:
        return env
    found = shutil.which("kvrouter")
    if found:
        return found
    repo = pathlib.Path(__file__).resolve().parents[2]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
    return str(target / "debug" / "kvrouter")


@contextlib.contextmanager
def mock_workers(n: int = 2, block_size: int = 16) -> Iterator[List[Dict[str, Any]]]:
    """`n` mock vLLM workers; yields their workers-file lines, each with an `id` (1..n)."""
    proc = subprocess.Popen(
        [kvrouter_binary(), "mocker", "--num-workers", str(n), "--block-size", str(block_size),
         "--speedup-ratio", "10"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        workers = [dict(json.loads(proc.stdout.readline()), id=i + 1) for i in range(n)]
        yield workers
    finally:
        proc.terminate()
        proc.wait(10)
