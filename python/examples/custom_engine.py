"""A custom engine publishing its KV events: any engine that keeps a prefix cache can make a
kvrouter route by it. It publishes each KV block it stores (and each it evicts) with
`KvEventPublisher`, which speaks vLLM's ZMQ wire format, so a KvRouter (or a kvrouter
frontend) subscribes to it exactly as to a vLLM worker.

The engine here is a toy that echoes the prompt back: an OpenAI-style `/v1/completions` over
HTTP (what kvrouter sends requests to), a prefix cache of whole blocks, and its KV events.

Run: `python custom_engine.py` (needs nothing else)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Set

from kvrouter import KvEventPublisher, KvRouter, compute_block_hash_for_seq, compute_seq_hash_for_block

BLOCK = 16


class ToyEngine:
    def __init__(self, worker_id: int, block_size: int = BLOCK) -> None:
        self.worker_id = worker_id
        self.block_size = block_size
        self.cache: Set[int] = set()
        self.lock = threading.Lock()
        self.events = KvEventPublisher(worker_id, block_size)
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                tokens: List[int] = body["prompt"]
                cached = engine.prefill(tokens)
                out = tokens[: body.get("max_tokens") or 4]
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                usage = {"prompt_tokens": len(tokens), "completion_tokens": len(out),
                         "total_tokens": len(tokens) + len(out),
                         "prompt_tokens_details": {"cached_tokens": cached}}
                for i, t in enumerate(out):
                    last = i == len(out) - 1
                    self.chunk({"choices": [{"index": 0, "text": "", "token_ids": [t],
                                             "finish_reason": "length" if last else None}]})
                self.chunk({"choices": [], "usage": usage})
                done = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

            def chunk(self, event: Dict[str, Any]) -> None:
                data = b"data: " + json.dumps(event).encode() + b"\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def prefill(self, tokens: List[int]) -> int:
        """Reuses the cached whole blocks of the prompt's prefix, stores the rest and publishes
        them; returns the prompt tokens that were cached."""
        n = len(tokens) // self.block_size
        hashes = compute_seq_hash_for_block(compute_block_hash_for_seq(tokens[: n * self.block_size], self.block_size))
        with self.lock:
            hit = 0
            while hit < n and hashes[hit] in self.cache:
                hit += 1
            if hit < n:
                self.events.publish_stored(tokens[hit * self.block_size: n * self.block_size], self.block_size,
                                           hashes[hit:], parent_hash=hashes[hit - 1] if hit else None)
                self.cache.update(hashes[hit:])
        return hit * self.block_size

    def spec(self) -> Dict[str, Any]:
        """Its entry for a KvRouter (the workers-file schema)."""
        return {"id": self.worker_id, "url": f"http://127.0.0.1:{self.server.server_address[1]}",
                "kv_events_endpoint": self.events.endpoint, "replay_endpoint": self.events.replay_endpoint,
                "block_size": self.block_size}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.events.shutdown()


async def main() -> Dict[str, Any]:
    """Two toy engines behind a KvRouter: a prompt served once is then found cached by the
    router (from the engine's KV events) and routed back to that engine, which reports the
    hit."""
    engines = [ToyEngine(1), ToyEngine(2)]
    try:
        with KvRouter(block_size=BLOCK, workers=[e.spec() for e in engines]) as router:
            prompt = list(range(500, 500 + 5 * BLOCK + 3))
            first = await router.generate(prompt, "toy")
            out1 = [c async for c in first]
            while (await router.best_worker(prompt))[2] < 5:  # the events reach the router
                await asyncio.sleep(0.02)
            predicted = await router.best_worker(prompt)
            second = await router.generate(prompt, "toy")
            out2 = [c async for c in second]
            return {"first_worker": first.worker_id, "predicted": predicted, "second_worker": second.worker_id,
                    "cached_tokens": out2[-1]["usage"]["prompt_tokens_details"]["cached_tokens"],
                    "output": [t for c in out1 for t in c["token_ids"]]}
    finally:
        for e in engines:
            e.close()


if __name__ == "__main__":
    print(asyncio.run(main()))
