"""KvRouter against real mock workers (`kvrouter mocker`, over HTTP and ZMQ KV events): generate
streams and frees its load (also when left early), best_worker is query-only without a request
id and books with one, errors have their types, two threads route at once, close() stops it."""

import asyncio
import json
import pathlib
import threading
import time
from typing import Any, Dict, List, TypeVar, cast

import pytest

from helpers import Mocker, wait_for
from kvrouter import (
    AllWorkersBusy,
    GenerateStream,
    KvRouter,
    KvRouterConfig,
    Ready,
    RouterConfig,
    RouterMode,
    UnknownRequest,
    WorkerUnavailable,
)

BS = 16
T = TypeVar("T")


def prompt(seed: int, blocks: int = 4) -> List[int]:
    return [seed * 1000 + i for i in range(blocks * BS)]


def done(x: "Ready[T]") -> T:
    """The value of a routing call's awaitable, which is complete on return (no event loop
    needed, so usable inside and outside coroutines)."""
    it = x.__await__()
    try:
        next(it)
    except StopIteration as e:
        return cast(T, e.value)
    raise AssertionError("a routing call's awaitable was not complete")


def loads(r: KvRouter, tokens: List[int]) -> Dict[int, Dict[str, int]]:
    return {ld["worker_id"]: ld for ld in done(r.get_potential_loads(tokens))}


def idle(r: KvRouter, tokens: List[int]) -> bool:
    return all(ld["active_requests"] == 0 and ld["potential_prefill_tokens"] == len(tokens)
               for ld in loads(r, tokens).values())


def device_overlap(r: KvRouter, tokens: List[int]) -> Dict[int, int]:
    scores = done((r.get_overlap_scores(tokens)))
    return {w["worker_id"]: w["device"] for w in scores["workers"]}


@pytest.fixture(scope="module")
def router(mocker: Mocker) -> Any:
    with KvRouter(block_size=BS, workers=mocker.workers) as r:
        yield r


async def collect(stream: GenerateStream) -> List[Dict[str, Any]]:
    return [c async for c in stream]


def test_generate_streams_and_a_repeat_is_a_cache_hit(router: KvRouter) -> None:
    tokens = prompt(1)

    async def run() -> List[Dict[str, Any]]:
        stream = await router.generate(tokens, "mock", stop_conditions={"max_tokens": 5, "ignore_eos": True})
        assert stream.worker_id in (1, 2) and stream.dp_rank == 0 and stream.request_id
        # While streaming, the request is booked on its worker.
        chunks = []
        async for c in stream:
            chunks.append(c)
        return [dict(c, _worker=stream.worker_id) for c in chunks]

    first = asyncio.run(run())
    assert sum(len(c["token_ids"]) for c in first) == 5
    assert all(set(c) == {"token_ids", "text", "finish_reason", "usage", "_worker"} for c in first)
    last = first[-1]
    assert last["finish_reason"] == "length"
    assert last["usage"]["prompt_tokens"] == len(tokens)
    assert last["usage"]["completion_tokens"] == 5
    worker = last["_worker"]
    wait_for(lambda: device_overlap(router, tokens).get(worker) == 4, what="the worker's KV events")
    assert done((router.best_worker(tokens))) == (worker, 0, 4)
    second = asyncio.run(run())
    assert second[-1]["_worker"] == worker
    # The worker itself reports the prefix as cached (its full blocks but the last token's).
    assert second[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 3 * BS
    wait_for(lambda: idle(router, tokens), what="loads back to zero")
    events = json.loads(done((router.dump_events())))
    assert any(e["worker_id"] == worker for e in events)


def test_leaving_the_stream_early_frees_the_load(router: KvRouter) -> None:
    tokens = prompt(2)

    async def break_out() -> int:
        async for c in await router.generate(tokens, "mock", stop_conditions={"max_tokens": 200, "ignore_eos": True}):
            assert c["token_ids"]
            break
        return 0

    asyncio.run(break_out())
    wait_for(lambda: idle(router, tokens), timeout=5, what="the load freed after break")

    async def aclose() -> None:
        stream = await router.generate(tokens, "mock", stop_conditions={"max_tokens": 200, "ignore_eos": True})
        await stream.__anext__()
        busy = {w: ld["active_requests"] for w, ld in loads(router, tokens).items()}
        assert busy[stream.worker_id] == 1
        await stream.aclose()
        assert idle(router, tokens)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(aclose())


def test_best_worker_is_query_only_without_an_id_and_books_with_one(router: KvRouter) -> None:
    tokens = prompt(3)

    async def run() -> None:
        before = loads(router, tokens)
        for _ in range(20):
            await router.best_worker(tokens, {"overlap_score_weight": 2.0})
        assert loads(router, tokens) == before
        w, rank, overlap = await router.best_worker(tokens, request_id="req-1")
        assert rank == 0 and overlap == 0
        booked = loads(router, tokens)[w]
        assert booked["active_requests"] == 1
        assert booked["potential_prefill_tokens"] == 2 * len(tokens)
        with pytest.raises(ValueError, match="already booked"):
            await router.best_worker(tokens, request_id="req-1")
        await router.mark_prefill_complete("req-1")
        assert loads(router, tokens)[w]["potential_prefill_tokens"] == len(tokens)
        await router.free("req-1")
        assert idle(router, tokens)
        with pytest.raises(UnknownRequest, match="req-1"):
            await router.free("req-1")
        with pytest.raises(UnknownRequest):
            await router.mark_prefill_complete("never")

    asyncio.run(run())


def test_errors_have_their_types(router: KvRouter) -> None:
    async def run() -> None:
        with pytest.raises(ValueError, match="token_ids"):
            await router.best_worker([])
        with pytest.raises(ValueError, match="no_such_field"):
            await router.best_worker([1], {"no_such_field": 1})
        with pytest.raises(ValueError, match="request_id"):
            await router.free("")
        with pytest.raises(ValueError, match="sampling_options.n"):
            await router.generate([1, 2], "mock", sampling_options={"n": 2})
        with pytest.raises(ValueError, match="temprature"):
            await router.generate([1, 2], "mock", sampling_options={"temprature": 2})
        with pytest.raises(WorkerUnavailable, match="worker 99"):
            await router.generate([1, 2], "mock", worker_id=99)
        with pytest.raises(WorkerUnavailable):
            await router.generate([1, 2], "mock", dp_rank=3)
        with pytest.raises(ValueError, match="router_config_override"):
            await router.get_overlap_scores([1], {"router_temperature": -1.0})

    asyncio.run(run())
    with pytest.raises(TypeError):
        router.best_worker("not tokens")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        router.best_worker([-1])


def test_pinned_generate_and_overlap_scores_shape(router: KvRouter, mocker: Mocker) -> None:
    tokens = prompt(4, 2)

    async def run() -> None:
        stream = await router.generate(tokens, None, stop_conditions={"max_tokens": 2}, worker_id=2, dp_rank=0)
        assert stream.worker_id == 2
        await collect(stream)

    asyncio.run(run())
    scores = done((router.get_overlap_scores(tokens)))
    assert scores["block_size"] == BS and scores["num_blocks"] == 2 and scores["shared_cache"] is None
    assert sorted(w["worker_id"] for w in scores["workers"]) == [1, 2]
    assert set(scores["workers"][0]) == {"worker_id", "dp_rank", "device", "host_pinned", "disk", "shared"}
    assert [w["url"] for w in router.workers()] == [w["url"] for w in mocker.workers]
    assert router.block_size == BS and router.endpoint is None and not router.closed


def test_all_workers_busy(mocker: Mocker) -> None:
    cfg = RouterConfig(RouterMode.KV, KvRouterConfig(), active_prefill_tokens_threshold=10)
    with KvRouter(block_size=BS, workers=mocker.workers, router_config=cfg) as r:
        async def run() -> None:
            await r.best_worker(prompt(5), request_id="a")
            await r.best_worker(prompt(6), request_id="b")
            with pytest.raises(AllWorkersBusy):
                await r.best_worker(prompt(7))
            with pytest.raises(RuntimeError):  # AllWorkersBusy is a RuntimeError too
                await r.generate(prompt(7), "mock")
            await r.free("a")
            await r.free("b")
            await r.best_worker(prompt(7))

        asyncio.run(run())


def test_two_threads_route_at_once(router: KvRouter) -> None:
    errors: List[BaseException] = []
    served: List[int] = []

    def work(seed: int) -> None:
        async def run() -> None:
            for i in range(5):
                tokens = prompt(seed * 10 + i, 2)
                w, _, _ = await router.best_worker(tokens)
                assert w in (1, 2)
                stream = await router.generate(tokens, "mock", stop_conditions={"max_tokens": 3})
                chunks = await collect(stream)
                assert sum(len(c["token_ids"]) for c in chunks) == 3
                served.append(stream.worker_id)

        try:
            asyncio.run(run())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(served) == 10
    wait_for(lambda: idle(router, prompt(99)), what="loads back to zero")


def test_construction(mocker: Mocker, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="needs its workers"):
        KvRouter("dynamo.backend.generate", 16)
    with pytest.raises(ValueError, match="endpoint"):
        KvRouter("not-an-endpoint", 16, workers=mocker.workers)
    with pytest.raises(ValueError, match="no worker given serves endpoint `ns.other.generate`"):
        KvRouter("ns.other.generate", 16, workers=mocker.workers)
    with pytest.raises(FileNotFoundError):
        KvRouter(block_size=16, workers_file=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="url"):
        KvRouter(block_size=16, workers=[{"kv_events_endpoint": "tcp://127.0.0.1:1"}])
    with pytest.raises(ValueError, match="block_size"):
        KvRouter(block_size=0, workers=mocker.workers)
    with pytest.raises(ValueError, match="block size"):
        KvRouter(block_size=32, workers=mocker.workers)  # the workers' is 16
    with pytest.raises(ValueError, match="not both"):
        KvRouter(block_size=16, workers=mocker.workers, kv_router_config=KvRouterConfig(),
                 router_config=RouterConfig(RouterMode.KV))

    # A workers file; the endpoint selects its workers; block_size from the workers.
    lines = [dict(mocker.workers[0], endpoint="ns.prefill.generate", id=7), dict(mocker.workers[1], id=8)]
    path = tmp_path / "workers.jsonl"
    path.write_text("\n".join(json.dumps(w) for w in lines) + "\n")
    r = KvRouter("ns.prefill.generate", workers_file=str(path))
    assert r.block_size == 16 and r.endpoint == "ns.prefill.generate"
    assert [w["id"] for w in r.workers()] == [7]
    assert done((r.best_worker(prompt(8))))[0] == 7
    r.close()
    r.close()
    assert r.closed and "closed" in repr(r)
    with pytest.raises(RuntimeError, match="closed"):
        r.best_worker([1])
    # Garbage collection without close() stops it too.
    r2 = KvRouter(workers=mocker.workers)
    del r2


def test_a_stream_outlives_close(mocker: Mocker) -> None:
    r = KvRouter(workers=mocker.workers)

    async def run() -> None:
        stream = await r.generate(prompt(9), "mock", stop_conditions={"max_tokens": 100, "ignore_eos": True})
        await stream.__anext__()
        r.close()
        t0 = time.monotonic()
        with pytest.raises((RuntimeError, StopAsyncIteration)):
            while True:
                await stream.__anext__()
        assert time.monotonic() - t0 < 10
        await stream.aclose()

    asyncio.run(run())
