"""Custom load-based routing (minimizing time to first token): ask the router what each
worker's load would be with this request (`get_potential_loads`) and how much of the prompt
each already caches (`get_overlap_scores`), estimate the prefill work still to do on each, and
pin the request to the smallest with `generate(worker_id=..., dp_rank=...)`.

Run: `python load_based_routing.py` (starts two mock workers with `kvrouter mocker`)."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Sequence, Tuple

from kvrouter import KvRouter

BLOCK = 16


async def least_prefill(router: KvRouter, tokens: List[int]) -> Tuple[int, int, Dict[Tuple[int, int], int]]:
    """`(worker_id, dp_rank, estimates)`: estimated prefill tokens per rank = the rank's
    prefill tokens in flight plus this prompt's, less the prompt tokens it already caches."""
    loads = await router.get_potential_loads(tokens)
    scores = await router.get_overlap_scores(tokens)
    cached = {(w["worker_id"], w["dp_rank"]): w["device"] * scores["block_size"] for w in scores["workers"]}
    estimates = {(ld["worker_id"], ld["dp_rank"]): ld["potential_prefill_tokens"] - min(cached.get((ld["worker_id"], ld["dp_rank"]), 0), len(tokens))
                 for ld in loads}
    worker_id, dp_rank = min(estimates, key=lambda k: estimates[k])
    return worker_id, dp_rank, estimates


async def main(workers: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Keeps one worker busy with a long prefill booked by another client, then routes a new
    request by least estimated prefill; returns the choice and the loads afterwards."""
    with KvRouter(block_size=BLOCK, workers=workers) as router:
        long_prompt = list(range(1, 64 * BLOCK + 1))
        busy_worker, _, _ = await router.best_worker(long_prompt, request_id="other-client")
        tokens = list(range(90_000, 90_000 + 4 * BLOCK))
        worker_id, dp_rank, estimates = await least_prefill(router, tokens)
        stream = await router.generate(tokens, "mock", stop_conditions={"max_tokens": 4},
                                       worker_id=worker_id, dp_rank=dp_rank)
        served = [c async for c in stream]
        await router.free("other-client")
        loads = await router.get_potential_loads(tokens)
        return {"busy_worker": busy_worker, "chosen": worker_id, "served_by": stream.worker_id,
                "estimates": estimates, "chunks": len(served), "loads_after": loads}


if __name__ == "__main__":
    from _workers import mock_workers

    with mock_workers(2, BLOCK) as ws:
        print(asyncio.run(main(ws)))
