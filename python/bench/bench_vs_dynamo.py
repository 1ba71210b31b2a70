"""kvrouter's Python bindings against NVIDIA Dynamo 1.6.1's, side by side in one process.

Measures, with the Python call overhead included (wall clock around Python calls, the best of
``--repeat`` passes, the two libraries interleaved so that a noisy host affects both):

* ``RadixTree.apply_event`` over the same JSON ``KvCacheEvent`` stream (simulated engines with
  LRU caches serving requests that share system prompts: stores of the blocks a worker does not
  hold yet, one removal per evicted block, as vLLM 0.33 publishes them);
* ``RadixTree.find_matches`` of 64-block queries on the tree that stream built (the same answers
  from both are checked), with and without reading ``.scores``;
* ``compute_block_hash_for_seq`` of a 32k-token prompt (block size 16; the same hashes checked),
  each call timed alone: the best and the median call.

Dynamo comes from the ``ai-dynamo-runtime`` wheel in another virtualenv of the same Python
version, whose site-packages is appended to ``sys.path``:

    .venv/bin/python python/bench/bench_vs_dynamo.py --dynamo-venv /work/dynvenv

(kvrouter itself: ``pip install ./python`` into the interpreter running the script; a release
build, which is what ``pip install`` makes by default.)
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional, OrderedDict, Sequence, Tuple

import kvrouter

MASK = (1 << 64) - 1
Event = Tuple[int, bytes]


def mix(a: int, b: int) -> int:
    """A 64-bit hash of two 64-bit values (splitmix64 finaliser), for engine block hashes."""
    x = (a * 0x9E3779B97F4A7C15 + b) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


class Workload:
    """Requests of `prompt + suffix` blocks routed mostly to the worker that served the prompt
    before; each worker an LRU cache of `capacity` blocks. Engine hashes are a function of the
    prefix, the same on every worker (vLLM with a fixed PYTHONHASHSEED), so that Dynamo's tree,
    which resolves parents through the first writer's hash, accepts every event."""

    def __init__(self, seed: int, workers: int, prompts: int, capacity: int) -> None:
        self.rng = random.Random(seed)
        self.workers = workers
        self.capacity = capacity
        self.prompts = [self.blocks(self.rng.randrange(16, 49)) for _ in range(prompts)]
        self.caches: List[OrderedDict[int, None]] = [collections.OrderedDict() for _ in range(workers)]
        self.event_ids = [0] * workers
        self.requests: List[List[int]] = []

    def blocks(self, n: int) -> List[int]:
        return [self.rng.getrandbits(64) for _ in range(n)]

    def events(self, n_requests: int) -> List[Event]:
        out: List[Event] = []
        for _ in range(n_requests):
            p = self.rng.randrange(len(self.prompts))
            local = self.prompts[p] + self.blocks(self.rng.randrange(8, 33))
            self.requests.append(local)
            # Mostly to the worker that has the prompt (as a KV-aware router sends them).
            w = p % self.workers if self.rng.random() < 0.8 else self.rng.randrange(self.workers)
            ext, parent = [], 0
            for h in local:
                parent = mix(parent, h)
                ext.append(parent)
            cache = self.caches[w]
            held = 0
            while held < len(ext) and ext[held] in cache:
                held += 1
            if held < len(ext):
                stored = {
                    "parent_hash": ext[held - 1] if held else None,
                    "blocks": [{"block_hash": e, "tokens_hash": t} for e, t in zip(ext[held:], local[held:])],
                }
                out.append((w, self.event(w, {"stored": stored})))
            # Parents are touched after their children, so eviction is leaf first.
            for e in reversed(ext):
                cache[e] = None
                cache.move_to_end(e)
            while len(cache) > self.capacity:
                victim, _ = cache.popitem(last=False)
                out.append((w, self.event(w, {"removed": {"block_hashes": [victim]}})))
        return out

    def event(self, w: int, data: Dict[str, Any]) -> bytes:
        eid = self.event_ids[w]
        self.event_ids[w] += 1
        return json.dumps({"event_id": eid, "data": data, "dp_rank": 0}).encode()

    def queries(self, n: int, length: int) -> List[List[int]]:
        """Recent requests cut or padded to `length` blocks: deep matches on a few workers."""
        out = []
        for _ in range(n):
            q = list(self.rng.choice(self.requests[-2000:]))
            q = (q + self.blocks(max(0, length - len(q))))[:length]
            out.append(q)
        return out


def best(repeat: int, f: Callable[[], float]) -> float:
    return min(f() for _ in range(repeat))


def time_apply(tree_cls: Callable[[], Any], events: Sequence[Event]) -> float:
    """Seconds per event to apply the whole stream to a fresh tree."""
    tree = tree_cls()
    apply = tree.apply_event
    t0 = time.perf_counter()
    for w, ev in events:
        apply(w, ev)
    return (time.perf_counter() - t0) / len(events)


def time_find(tree: Any, queries: Sequence[List[int]], scores: bool) -> float:
    find = tree.find_matches
    t0 = time.perf_counter()
    if scores:
        for q in queries:
            find(q).scores
    else:
        for q in queries:
            find(q)
    return (time.perf_counter() - t0) / len(queries)


def time_hash(f: Callable[..., List[int]], tokens: List[int], block: int, calls: int) -> List[float]:
    """Seconds of each of `calls` calls."""
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f(tokens, block)
        out.append(time.perf_counter() - t0)
    return out


def load_dynamo(venv: str) -> Any:
    pattern = os.path.join(venv, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")
    found = glob.glob(pattern)
    if not found:
        raise SystemExit(f"no {pattern}: Dynamo's venv must use this script's Python version")
    sys.path.append(found[0])
    import dynamo.llm

    return dynamo.llm


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dynamo-venv", default="/work/dynvenv")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=4096, help="blocks per worker cache")
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--query-blocks", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    dyn = load_dynamo(args.dynamo_venv)
    work = Workload(args.seed, args.workers, args.prompts, args.capacity)
    events = work.events(args.requests)
    queries = work.queries(args.queries, args.query_blocks)
    stores = sum(1 for _, e in events if b'"stored"' in e)
    print(f"stream: {len(events)} events ({stores} stored, {len(events) - stores} removed), "
          f"{args.workers} workers, queries of {args.query_blocks} blocks")

    libs: Dict[str, Any] = {"kvrouter": kvrouter, "dynamo": dyn}
    trees = {}
    for name, lib in libs.items():
        tree = lib.RadixTree()
        for w, ev in events:
            tree.apply_event(w, ev)
        trees[name] = tree
    for q in queries:
        a, b = trees["kvrouter"].find_matches(q).scores, trees["dynamo"].find_matches(q).scores
        assert a == b, (a, b)
    matched = sum(max(trees["kvrouter"].find_matches(q).scores.values(), default=0) for q in queries) / len(queries)
    print(f"answers identical; mean best match {matched:.1f} blocks")

    rng = random.Random(args.seed)
    tokens = [rng.randrange(152_000) for _ in range(args.prompt_tokens)]
    assert kvrouter.compute_block_hash_for_seq(tokens, 16) == dyn.compute_block_hash_for_seq(tokens, 16)

    results: Dict[str, Dict[str, float]] = {n: {} for n in libs}
    hash_calls: Dict[str, List[float]] = {n: [] for n in libs}
    for _ in range(args.repeat):
        for name, lib in libs.items():
            r = results[name]
            r["apply_us"] = min(r.get("apply_us", 1e9), time_apply(lib.RadixTree, events) * 1e6)
            r["find_us"] = min(r.get("find_us", 1e9), time_find(trees[name], queries, False) * 1e6)
            r["find_scores_us"] = min(r.get("find_scores_us", 1e9), time_find(trees[name], queries, True) * 1e6)
            hash_calls[name] += time_hash(lib.compute_block_hash_for_seq, tokens, 16, 40)
    for name, calls in hash_calls.items():
        calls.sort()
        results[name]["hash_us"] = calls[0] * 1e6
        results[name]["hash_median_us"] = calls[len(calls) // 2] * 1e6

    rows = [
        ("apply_event (µs/event)", "apply_us"),
        ("find_matches, 64 blocks (µs)", "find_us"),
        ("find_matches + .scores (µs)", "find_scores_us"),
        (f"compute_block_hash_for_seq, {args.prompt_tokens} tokens, best (µs)", "hash_us"),
        ("  same, median call (µs)", "hash_median_us"),
    ]
    print(f"\n{'':56} {'kvrouter':>10} {'Dynamo':>10} {'ratio':>7}")
    for label, key in rows:
        k, d = results["kvrouter"][key], results["dynamo"][key]
        print(f"{label:56} {k:10.2f} {d:10.2f} {d / k:6.1f}x")
    ev_k, ev_d = 1e6 / results["kvrouter"]["apply_us"], 1e6 / results["dynamo"]["apply_us"]
    print(f"{'apply_event (events/s)':56} {ev_k:10.0f} {ev_d:10.0f}")
    print(f"\nPython {platform.python_version()}, {platform.machine()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "events": len(events), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
