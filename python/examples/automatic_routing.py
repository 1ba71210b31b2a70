"""Automatic routing: `KvRouter.generate` picks the worker, books the request, marks its prefill
complete at the first token and frees it at the end. Requests sharing a long prefix go to the
worker that holds it; a per-request `router_config_override` changes the cost function for one
request only (here: a higher overlap weight, i.e. prefer cache hits over balance even more).

Run: `python automatic_routing.py` (starts two mock workers with `kvrouter mocker`)."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Sequence

from kvrouter import KvRouter, KvRouterConfig

BLOCK = 16
SYSTEM = list(range(1, 8 * BLOCK + 1))  # an 8-block shared prefix, e.g. a system prompt


async def ask(router: KvRouter, tokens: List[int], override: Dict[str, Any] | None = None) -> Dict[str, Any]:
    stream = await router.generate(tokens, "mock", stop_conditions={"max_tokens": 8},
                                   router_config_override=override)
    out: List[int] = []
    usage: Dict[str, Any] = {}
    async for chunk in stream:
        out += chunk["token_ids"]
        usage = chunk["usage"] or usage
    return {"worker_id": stream.worker_id, "tokens": out,
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


async def main(workers: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    with KvRouter(block_size=BLOCK, workers=workers, kv_router_config=KvRouterConfig(overlap_score_weight=1.0)) as router:
        results = [await ask(router, SYSTEM + [50_001, 50_002])]
        # KV events reach the router asynchronously: wait until it sees the prefix cached.
        while max(w["device"] for w in (await router.get_overlap_scores(SYSTEM))["workers"]) < 8:
            await asyncio.sleep(0.02)
        for i, question in enumerate([[60_001], [60_002, 60_003], [60_004]]):
            override = {"overlap_score_weight": 4.0} if i % 2 == 0 else None
            results.append(await ask(router, SYSTEM + question, override))
        return results


if __name__ == "__main__":
    from _workers import mock_workers

    with mock_workers(2, BLOCK) as ws:
        for r in asyncio.run(main(ws)):
            print(f"worker {r['worker_id']}: {r['cached_tokens']} prompt tokens cached, output {r['tokens']}")
