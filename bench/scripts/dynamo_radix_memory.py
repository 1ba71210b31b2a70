"""Replay an `apply_profile` warm-up dump into NVIDIA Dynamo 1.6.1's RadixTree; print its
resident-memory growth per (block, worker) entry, to compare with kvrouter's index on the same
stream.

    python3 -m venv /tmp/dynvenv
    /tmp/dynvenv/bin/pip install --no-deps ai-dynamo-runtime==1.6.1     # 75 MB wheel; RadixTree needs nothing else
    cargo run --release -p kvrouter-bench --example apply_profile -- 64 1 /tmp/warm64.jsonl
    /tmp/dynvenv/bin/python bench/scripts/dynamo_radix_memory.py /tmp/warm64.jsonl

Our simulated engines salt their block hashes per worker (so the router must treat them as
opaque). Dynamo 1.6.1's tree resolves a parent's position through the first writer's engine
hash and fails with "Failed to find parent block" on such streams, so the salt is removed
here: every worker then uses the same engine hash for the same block, as Dynamo's docs
recommend (PYTHONHASHSEED). kvrouter's memory does not depend on hash values.
"""
import gc
import json
import sys
import time

import dynamo._core as core

MASK = (1 << 64) - 1


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def unsalted(line):
    """Undo bench/src/cache.rs SimWorkerCache's per-worker salt on engine hashes."""
    o = json.loads(line)
    ev = o["event"]
    salt = splitmix64(o["worker_id"] ^ (ev.get("dp_rank", 0) << 48) ^ 0x5EED)
    data = ev["data"]
    if isinstance(data, dict) and "stored" in data:
        s = data["stored"]
        if s["parent_hash"] is not None:
            s["parent_hash"] ^= salt
        for b in s["blocks"]:
            b["block_hash"] ^= salt
    elif isinstance(data, dict) and "removed" in data:
        data["removed"]["block_hashes"] = [h ^ salt for h in data["removed"]["block_hashes"]]
    return o["worker_id"], json.dumps(ev).encode()


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(path):
    with open(path) as f:
        events = [unsalted(line) for line in f]
    gc.collect()
    before = rss()
    tree = core.RadixTree()
    t0 = time.time()
    for worker_id, ev in events:
        tree.apply_event(worker_id, ev)
    elapsed = time.time() - t0
    grown = rss() - before
    live = sum(len(json.loads(d)["event"]["data"]["stored"]["blocks"]) for d in tree.dump_tree_as_events())
    print(f"{path}: {len(events)} events ({elapsed:.2f} s through Python), {live} entries, "
          f"RSS +{grown / 1e6:.1f} MB = {grown / live:.1f} B/entry")


if __name__ == "__main__":
    main(sys.argv[1])
