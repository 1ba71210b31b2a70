"""The installed package: what it exports and ships (stubs, py.typed, docstrings), its exception
hierarchy, its stubs checked against the runtime module (mypy's stubtest) and used strictly
(mypy --strict over these tests and the benchmark script, and over misuse that the stubs must
catch)."""

import importlib.resources
import inspect
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import List

import pytest

import kvrouter
import kvrouter.exceptions as exc
from helpers import REPO, kvrouter_bin

PYPROJECT = REPO / "python" / "pyproject.toml"
MYPY_CACHE = REPO / "target" / "mypy-cache"


def test_exports_and_docstrings() -> None:
    for name in kvrouter.__all__:
        assert hasattr(kvrouter, name), name
    assert kvrouter.__version__
    for mod in (kvrouter, exc, kvrouter._core):
        assert mod.__doc__ and len(mod.__doc__) > 40, mod
    for name in kvrouter.__all__:
        obj = getattr(kvrouter, name)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            assert obj.__doc__, name


def test_typed_package_files_are_shipped() -> None:
    files = importlib.resources.files("kvrouter")
    assert files.joinpath("py.typed").is_file()
    assert files.joinpath("_core.pyi").is_file()
    assert "class RadixTree" in files.joinpath("_core.pyi").read_text()
    # Installed from python/, not imported from the source tree.
    assert pathlib.Path(kvrouter.__file__).parent != REPO / "python" / "kvrouter"


def test_exception_hierarchy() -> None:
    # kvrouter's base, plus the built-in Dynamo's bindings raise in the same case.
    pairs = [
        (exc.KvEventError, RuntimeError),
        (exc.ParentBlockNotFound, exc.KvEventError),
        (exc.BlockNotFound, exc.KvEventError),
        (exc.InvalidBlockSequence, exc.KvEventError),
        (exc.UnsupportedOption, ValueError),
        (exc.WorkerUnavailable, RuntimeError),
        (exc.AllWorkersBusy, RuntimeError),
        (exc.RouterQueueLimitExceeded, exc.AllWorkersBusy),
        (exc.UnknownRequest, KeyError),
        (exc.WorkerError, RuntimeError),
    ]
    for cls, base in pairs:
        assert issubclass(cls, base), (cls, base)
        assert issubclass(cls, exc.KvRouterError), cls
    assert set(exc.__all__) <= set(kvrouter.__all__)


def run(args: List[str], cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPY_CACHE_DIR": str(MYPY_CACHE)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_stubs_match_the_runtime_module(tmp_path: pathlib.Path) -> None:
    # (stubtest keeps its cache in the working directory)
    proc = run(["-m", "mypy.stubtest", "kvrouter", "--mypy-config-file", str(PYPROJECT)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_on_tests_and_bench() -> None:
    proc = run(["-m", "mypy", "--config-file", str(PYPROJECT), "python/kvrouter", "python/tests", "python/bench", "python/examples"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stubs_catch_misuse(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "misuse.py"
    bad.write_text(textwrap.dedent("""\
        from kvrouter import KvRouterConfig, RadixTree, compute_block_hash_for_seq
        KvRouterConfig(router_replica_sync=True)
        KvRouterConfig(router_temprature=0.5)
        RadixTree().find_matches("abc", early_exit=1.5)
        x: str = compute_block_hash_for_seq([1, 2], 16)
        """))
    proc = run(["-m", "mypy", "--strict", str(bad)])
    out = proc.stdout
    assert proc.returncode == 1, out
    for line, what in [(2, "router_replica_sync"), (3, "router_temprature"), (4, "find_matches"), (5, "assignment")]:
        assert f"misuse.py:{line}:" in out and what in out, (what, out)


@pytest.mark.parametrize("name", ["RadixTree", "ApproxKvIndexer", "KvRouterConfig", "KvEventPublisher"])
def test_classes_are_final(name: str) -> None:
    cls = getattr(kvrouter, name)
    with pytest.raises(TypeError):
        type("Sub", (cls,), {})


def test_readme_examples_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Python examples, as written: `KvRouter` in front of `kvrouter mocker` (the
    binary put on PATH, as an installed one would be), then the publisher and the index on free
    ports."""
    binary = kvrouter_bin()
    if binary is None:
        pytest.skip("no kvrouter binary built")
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Python\n"):]
    section = section[: section.index("\n## ", 1)]
    blocks = section.split("```python\n")[1:]
    assert len(blocks) == 2, "the README's Python section has two examples"
    routing, index = (b[: b.index("```")] for b in blocks)
    exec(compile(routing, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    # The last chunk: finish reason and usage (the mocker's 199-token prompt, 4 tokens out).
    assert " length " in out[-3] and "'completion_tokens': 4" in out[-3], out
    # (worker_id, dp_rank, overlap_blocks): at most the prompt's 12 full blocks, however far
    # the worker's KV events have got.
    best = eval(out[-2])
    assert len(best) == 3 and best[1] == 0 and 0 <= best[2] <= 12, out
    assert "potential_prefill_tokens" in out[-1], out
    index = index.replace(":5557", ":0").replace(":5558", ":0")
    exec(compile(index, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "{(1, 0): 4}"
