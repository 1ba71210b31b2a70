"""RadixTree: the reference's JSON events (spec §3.1) and behaviour checks (Appendix A),
errors, dump → apply round trip, and concurrent use from several threads."""

import json
import random
import threading
from typing import Dict, List, Optional, Tuple

import pytest

from helpers import cleared, removed, stored
from kvrouter import (
    BlockNotFound,
    InvalidBlockSequence,
    KvEventError,
    KvRouterError,
    OverlapScores,
    ParentBlockNotFound,
    RadixTree,
    compute_block_hash_for_seq,
)

H = compute_block_hash_for_seq(list(range(1, 65)), 16)  # 4 local hashes


def chain(ext0: int, n: int) -> List[Tuple[int, int]]:
    return [(ext0 + i, H[i]) for i in range(n)]


def test_appendix_a_behaviour() -> None:
    t = RadixTree()
    t.apply_event(7, stored(0, chain(1000, 4)))
    t.apply_event(8, stored(0, chain(2000, 2), dp_rank=1))
    s = t.find_matches(H)
    assert isinstance(s, OverlapScores)
    assert s.scores == {(7, 0): 4, (8, 1): 2}
    assert s.frequencies == []
    assert len(s) == 2
    # A parent that only worker 7 holds does not exist for worker 8 / rank 0.
    with pytest.raises(ParentBlockNotFound, match="Failed to apply event") as e:
        t.apply_event(8, stored(1, [(2100, H[2])], parent=1001))
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, KvEventError)
    assert isinstance(e.value, KvRouterError)
    # Removing worker 7's third block drops its score to 2.
    t.apply_event(7, removed(1, [1002]))
    assert t.find_matches(H).scores == {(7, 0): 2, (8, 1): 2}
    t.apply_event(7, cleared(2))
    assert t.find_matches(H).scores == {(8, 1): 2}


def test_json_accepted_as_bytes_or_str_and_defaults() -> None:
    t = RadixTree()
    ev = {"event_id": 0, "data": {"stored": {"parent_hash": None, "blocks": [{"block_hash": 1, "tokens_hash": H[0]}]}}}
    t.apply_event(3, json.dumps(ev))  # str; dp_rank defaults to 0
    assert t.find_matches(H).scores == {(3, 0): 1}
    # Fields Dynamo's JSON may carry (start_position, mm_extra_info) and unknown ones are fine.
    ev2 = {
        "event_id": 1,
        "data": {"stored": {"parent_hash": 1, "start_position": 1, "blocks": [{"block_hash": 2, "tokens_hash": H[1], "mm_extra_info": None}]}},
        "dp_rank": 0,
        "extra": True,
    }
    t.apply_event(3, json.dumps(ev2).encode())
    assert t.find_matches(H).scores == {(3, 0): 2}
    assert t.current_size() == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (b"not json", "Failed to deserialize KvCacheEvent"),
        (b'{"event_id": 1}', "missing field `data`"),
        (b'{"event_id": 1, "data": {"stored": {"parent_hash": null, "blocks": [{"block_hash": "x", "tokens_hash": 1}]}}}', "invalid type"),
        (b'{"event_id": -1, "data": "cleared"}', "Failed to deserialize"),
        (b'{"event_id": 1, "data": "exploded"}', "unknown variant"),
        (b'{"event_id": 1, "data": {"removed": {"block_hashes": [18446744073709551616]}}}', "Failed to deserialize"),
        (b"", "EOF"),
    ],
)
def test_malformed_json_raises_value_error(bad: bytes, match: str) -> None:
    t = RadixTree()
    with pytest.raises(ValueError, match=match):
        t.apply_event(1, bad)
    assert t.current_size() == 0


def test_wrong_argument_types() -> None:
    t = RadixTree()
    with pytest.raises(TypeError, match="bytes or str"):
        t.apply_event(1, 42)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        t.apply_event(-1, cleared(0))
    with pytest.raises(OverflowError, match=r"sequence\[0\]"):
        t.find_matches([-1])
    with pytest.raises(TypeError):
        t.find_matches(["a"])  # type: ignore[list-item]


def test_index_errors() -> None:
    t = RadixTree()
    t.apply_event(1, stored(0, chain(10, 2)))
    with pytest.raises(BlockNotFound, match="Failed to apply event"):
        t.apply_event(1, removed(1, [999]))
    # Known hashes in the same removal are still removed.
    with pytest.raises(BlockNotFound):
        t.apply_event(1, removed(2, [11, 999]))
    assert t.find_matches(H).scores == {(1, 0): 1}
    # Self-referencing stores are rejected whole.
    with pytest.raises(InvalidBlockSequence):
        t.apply_event(1, stored(3, [(10, H[1])], parent=10))
    with pytest.raises(InvalidBlockSequence):
        t.apply_event(1, stored(4, [(50, H[0]), (50, H[1])]))
    assert t.find_matches(H).scores == {(1, 0): 1}


def test_remove_worker_and_clear_all_blocks() -> None:
    t = RadixTree()
    for w in (1, 2):
        for rank in (0, 1):
            t.apply_event(w, stored(0, chain(100 * w + 10 * rank, 4), dp_rank=rank))
    assert t.current_size() == 16
    t.clear_all_blocks(1)
    assert t.find_matches(H).scores == {(2, 0): 4, (2, 1): 4}
    t.remove_worker(2)
    assert t.find_matches(H).scores == {}
    assert t.current_size() == 0
    # Unknown workers are fine.
    t.remove_worker(99)
    t.clear_all_blocks(99)


def test_early_exit() -> None:
    # With early_exit the walk may stop once a single rank is left, so that rank's score may
    # be shorter than its full match; every rank that matches is still reported.
    t = RadixTree()
    t.apply_event(1, stored(0, chain(10, 4)))
    t.apply_event(2, stored(0, chain(20, 1)))
    full = t.find_matches(H).scores
    assert full == {(1, 0): 4, (2, 0): 1}
    early = t.find_matches(H, early_exit=True).scores
    assert early.keys() == full.keys()
    assert all(1 <= early[k] <= full[k] for k in full)
    assert early[(2, 0)] == 1


def random_tree(seed: int, workers: int = 5, requests: int = 200) -> Tuple[RadixTree, List[List[int]]]:
    """A tree fed by simulated engines: shared prompts, per-worker engine hashes, evictions."""
    rng = random.Random(seed)
    prompts = [[rng.getrandbits(64) for _ in range(rng.randrange(2, 10))] for _ in range(6)]
    t = RadixTree()
    queries = []
    held: Dict[Tuple[int, int], List[int]] = {}
    eid = 0
    for _ in range(requests):
        w, rank = rng.randrange(workers), rng.randrange(2)
        q = rng.choice(prompts) + [rng.getrandbits(64) for _ in range(rng.randrange(0, 6))]
        queries.append(q)
        chain_ = held.setdefault((w, rank), [])
        # The worker's held chain is one prompt at a time here: replace it.
        if chain_:
            t.apply_event(w, removed(eid, [chain_[0]], dp_rank=rank))
            eid += 1
        ext = [(w << 56) ^ (rank << 48) ^ (i + 1) ^ (h & 0xFFFF_FFFF_0000) for i, h in enumerate(q)]
        t.apply_event(w, stored(eid, list(zip(ext, q)), dp_rank=rank))
        eid += 1
        held[(w, rank)] = ext
    return t, queries


def blocks_of(dump: List[str]) -> Dict[Tuple[int, int, int], Tuple[Optional[int], int]]:
    """What a dump says, however it groups blocks into events: per (worker, rank, engine
    hash), the parent's engine hash and the block's local hash."""
    out: Dict[Tuple[int, int, int], Tuple[Optional[int], int]] = {}
    for line in dump:
        o = json.loads(line)
        ev = o["event"]
        parent = ev["data"]["stored"]["parent_hash"]
        for b in ev["data"]["stored"]["blocks"]:
            key = (o["worker_id"], ev["dp_rank"], b["block_hash"])
            assert key not in out
            out[key] = (parent, b["tokens_hash"])
            parent = b["block_hash"]
    return out


def test_dump_round_trip() -> None:
    t, queries = random_tree(1)
    dump = t.dump_tree_as_events()
    assert dump and all(isinstance(e, str) for e in dump)
    # Whole RouterEvents, applied with their worker ids.
    again = RadixTree()
    for line in dump:
        again.apply_event(json.loads(line)["worker_id"], line)
    # Their KvCacheEvent part (what Dynamo's apply_event takes).
    inner = RadixTree()
    for line in dump:
        o = json.loads(line)
        assert set(o) >= {"worker_id", "storage_tier", "event"}
        inner.apply_event(o["worker_id"], json.dumps(o["event"]).encode())
    for q in queries:
        want = t.find_matches(q).scores
        assert again.find_matches(q).scores == want
        assert inner.find_matches(q).scores == want
    assert again.current_size() == inner.current_size() == t.current_size()
    assert blocks_of(again.dump_tree_as_events()) == blocks_of(dump)
    # A RouterEvent of another worker is refused.
    with pytest.raises(ValueError, match="not worker"):
        RadixTree().apply_event(json.loads(dump[0])["worker_id"] + 1, dump[0])


def test_threads_apply_and_find_concurrently() -> None:
    """One writer applies a growing chain while readers look it up: every answer a reader
    gets is a state the writer went through (scores only grow), and the end state is the
    sequential one."""
    n = 3000
    rng = random.Random(3)
    local = [rng.getrandbits(64) for _ in range(n)]
    t = RadixTree()
    errors: List[BaseException] = []
    done = threading.Event()
    start = threading.Barrier(3)
    reads = [0, 0]

    def writer() -> None:
        try:
            start.wait()
            t.apply_event(1, stored(0, [(1, local[0])]))
            for i in range(1, n):
                t.apply_event(1, stored(i, [(i + 1, local[i])], parent=i))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def reader(r: int) -> None:
        try:
            start.wait()
            last = 0
            while not done.is_set():
                got = t.find_matches(local).scores.get((1, 0), 0)
                assert got >= last, (got, last)
                last = got
                reads[r] += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert all(reads), reads
    assert t.find_matches(local).scores == {(1, 0): n}


def test_threads_on_different_workers() -> None:
    """Four threads each feed their own worker; the result equals applying the same events
    from one thread."""
    per_worker = {w: random_events(w) for w in range(4)}
    t = RadixTree()

    def feed(w: int) -> None:
        for e in per_worker[w]:
            t.apply_event(w, e)

    threads = [threading.Thread(target=feed, args=(w,)) for w in per_worker]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ref = RadixTree()
    for w, evs in per_worker.items():
        for e in evs:
            ref.apply_event(w, e)
    assert blocks_of(t.dump_tree_as_events()) == blocks_of(ref.dump_tree_as_events())


def random_events(w: int) -> List[bytes]:
    rng = random.Random(w)
    out = []
    for i in range(300):
        blocks = [(w << 32 | i << 8 | k, rng.getrandbits(64)) for k in range(4)]
        out.append(stored(i, blocks))
    return out
