"""The examples of python/examples/ run against real mock workers (and the custom engine
against its own toy engines), and do what each pattern promises."""

import asyncio
import importlib
import pathlib
import sys
from types import ModuleType
from typing import Any

from helpers import REPO, Mocker

EXAMPLES = REPO / "python" / "examples"


def example(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def test_automatic_routing_sends_a_shared_prefix_to_its_worker(mocker: Mocker) -> None:
    results: Any = asyncio.run(example("automatic_routing").main(mocker.workers))
    first, *later = results
    assert all(len(r["tokens"]) == 8 for r in results)
    # Every later request went to the worker holding the 8-block prefix, which reported it.
    assert {r["worker_id"] for r in later} == {first["worker_id"]}
    assert all(r["cached_tokens"] >= 8 * 16 for r in later)


def test_manual_routing_repeat_is_a_cache_hit(mocker: Mocker) -> None:
    first, second = asyncio.run(example("manual_routing").main(mocker.workers))
    assert second[0] == first[0]  # the same worker
    assert second[1] == 6  # the router predicted the 6 blocks
    assert second[2] >= 5 * 16  # and the worker reported them cached


def test_hierarchical_probing_picks_the_pool_with_more_overlap(mocker: Mocker) -> None:
    r: Any = asyncio.run(example("hierarchical_probing").main(mocker.workers))
    assert r["pool"] == "b" and r["worker_id"] == mocker.workers[1]["id"]
    assert r["overlap_blocks"] == 10 and r["cached_tokens"] >= 10 * 16


def test_load_based_routing_avoids_the_busy_worker_and_loads_return_to_zero(mocker: Mocker) -> None:
    r: Any = asyncio.run(example("load_based_routing").main(mocker.workers))
    assert r["chosen"] != r["busy_worker"] and r["served_by"] == r["chosen"]
    assert r["estimates"][(r["busy_worker"], 0)] > r["estimates"][(r["chosen"], 0)]
    assert r["chunks"] > 0
    assert all(ld["active_requests"] == 0 for ld in r["loads_after"])


def test_custom_engine_events_make_the_router_send_the_repeat_back() -> None:
    r: Any = asyncio.run(example("custom_engine").main())
    assert r["predicted"] == (r["first_worker"], 0, 5)
    assert r["second_worker"] == r["first_worker"]
    assert r["cached_tokens"] == 5 * 16
    assert len(r["output"]) == 4


def test_examples_are_listed() -> None:
    names = sorted(p.stem for p in pathlib.Path(EXAMPLES).glob("*.py") if not p.stem.startswith("_"))
    assert names == ["automatic_routing", "custom_engine", "hierarchical_probing", "load_based_routing",
                     "manual_routing"]
