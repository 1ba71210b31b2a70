"""Hierarchical routing: one KvRouter per pool of workers (e.g. per region or per model
replica set), and a top level that probes each pool's router with a query-only `best_worker`
and sends the request to the pool whose best worker holds the most of the prompt.

Run: `python hierarchical_probing.py` (starts two mock workers, one per pool)."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Sequence, Tuple

from kvrouter import KvRouter

BLOCK = 16


async def probe(pools: Dict[str, KvRouter], tokens: List[int]) -> Tuple[str, int, int]:
    """The pool whose best worker has the longest cached prefix: `(pool, worker, blocks)`."""
    answers = {name: await r.best_worker(tokens) for name, r in pools.items()}
    name = max(answers, key=lambda n: answers[n][2])
    worker_id, _, overlap = answers[name]
    return name, worker_id, overlap


async def generate(router: KvRouter, tokens: List[int]) -> int:
    """Serves the request through `router`; the worker's count of cached prompt tokens."""
    cached = 0
    async for chunk in await router.generate(tokens, "mock", stop_conditions={"max_tokens": 4}):
        if chunk["usage"]:
            cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    return cached


async def main(workers: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Warms pool `b` with a document, then routes a question about it; returns the probe's
    choice and what the worker reported."""
    document = list(range(7_000, 7_000 + 10 * BLOCK))
    with KvRouter(block_size=BLOCK, workers=[workers[0]]) as a, KvRouter(block_size=BLOCK, workers=[workers[1]]) as b:
        pools = {"a": a, "b": b}
        await generate(b, document + [1])
        while (await b.best_worker(document))[2] < 10:  # until b's router has the KV events
            await asyncio.sleep(0.02)
        pool, worker, overlap = await probe(pools, document + [2, 3])
        cached = await generate(pools[pool], document + [2, 3])
        return {"pool": pool, "worker_id": worker, "overlap_blocks": overlap, "cached_tokens": cached}


if __name__ == "__main__":
    from _workers import mock_workers

    with mock_workers(2, BLOCK) as ws:
        print(asyncio.run(main(ws)))
