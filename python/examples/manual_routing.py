"""Manual state management: the caller sends requests itself. `best_worker(request_id=...)`
picks the worker and books the request there; the caller marks prefill complete at the first
token and frees the booking at the end (the router's load model then matches reality).
Without `request_id`, `best_worker` is a pure query.

Run: `python manual_routing.py` (starts two mock workers with `kvrouter mocker`)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any, Dict, List, Sequence, Tuple

from kvrouter import KvRouter

BLOCK = 16


def completions(url: str, tokens: List[int], on_first_token: Any) -> Dict[str, Any]:
    """A streamed `/v1/completions` on the worker itself; returns its usage."""
    body = json.dumps({"prompt": tokens, "max_tokens": 4, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"content-type": "application/json"})
    usage: Dict[str, Any] = {}
    first = True
    with urllib.request.urlopen(req, timeout=30) as resp:
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first:
                first = False
                on_first_token()
            usage = event.get("usage") or usage
    return usage


async def serve_one(router: KvRouter, urls: Dict[int, str], tokens: List[int], request_id: str) -> Tuple[int, int, int]:
    worker_id, dp_rank, overlap_blocks = await router.best_worker(tokens, request_id=request_id)
    loop = asyncio.get_running_loop()

    def first_token() -> None:  # called on the HTTP thread: hand the call to the event loop
        asyncio.run_coroutine_threadsafe(_mark(router, request_id), loop).result()

    try:
        usage = await asyncio.to_thread(completions, urls[worker_id], tokens, first_token)
    finally:
        await router.free(request_id)
    return worker_id, overlap_blocks, usage["prompt_tokens_details"]["cached_tokens"]


async def _mark(router: KvRouter, request_id: str) -> None:
    await router.mark_prefill_complete(request_id)


async def main(workers: Sequence[Dict[str, Any]]) -> List[Tuple[int, int, int]]:
    """Sends one prompt twice; returns `(worker, overlap_blocks, cached_tokens)` per send and
    the loads at the end."""
    urls = {w["id"]: w["url"] for w in workers}
    tokens = list(range(100, 100 + 6 * BLOCK))
    with KvRouter(block_size=BLOCK, workers=workers) as router:
        first = await serve_one(router, urls, tokens, "manual-1")
        while (await router.best_worker(tokens))[2] < 6:  # wait for the worker's KV events
            await asyncio.sleep(0.02)
        second = await serve_one(router, urls, tokens, "manual-2")
        loads = await router.get_potential_loads(tokens)
        assert all(ld["active_requests"] == 0 for ld in loads)
        return [first, second]


if __name__ == "__main__":
    from _workers import mock_workers

    with mock_workers(2, BLOCK) as ws:
        for worker, overlap, cached in asyncio.run(main(ws)):
            print(f"worker {worker}: router predicted {overlap} cached blocks, worker reported {cached} cached tokens")
