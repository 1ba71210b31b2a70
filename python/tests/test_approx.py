"""ApproxKvIndexer: routing decisions recorded and found, per dp rank and LoRA, awaitable like
Dynamo's async method, expiring after the TTL, pruned past its size."""

import asyncio
import time

import pytest

from kvrouter import ApproxKvIndexer, Completed

TOKENS = list(range(1, 65))  # 4 blocks of 16


def test_decisions_are_found() -> None:
    idx = ApproxKvIndexer(16)
    assert idx.block_size() == 16
    assert idx.find_matches_for_request(TOKENS).scores == {}
    done = idx.process_routing_decision_for_request(TOKENS[:48], 7)
    assert isinstance(done, Completed)
    idx.process_routing_decision_for_request(TOKENS, 8, dp_rank=1)
    assert idx.find_matches_for_request(TOKENS).scores == {(7, 0): 3, (8, 1): 4}
    # Only full blocks count; a diverging request matches its common prefix.
    assert idx.find_matches_for_request(TOKENS[:40]).scores == {(7, 0): 2, (8, 1): 2}
    assert idx.find_matches_for_request(TOKENS[:16] + [0] * 48).scores == {(7, 0): 1, (8, 1): 1}
    assert idx.current_size() == 7
    idx.remove_worker(8)
    assert idx.find_matches_for_request(TOKENS).scores == {(7, 0): 3}


def test_lora_and_eagle_hash_separately() -> None:
    idx = ApproxKvIndexer(16)
    idx.process_routing_decision_for_request(TOKENS, 1, lora_name="a")
    assert idx.find_matches_for_request(TOKENS).scores == {}
    assert idx.find_matches_for_request(TOKENS, lora_name="a").scores == {(1, 0): 4}
    idx.process_routing_decision_for_request(TOKENS + [7], 2, is_eagle=True)
    assert idx.find_matches_for_request(TOKENS + [7], is_eagle=True).scores == {(2, 0): 4}


def test_awaitable_like_dynamo() -> None:
    idx = ApproxKvIndexer(16)

    async def route() -> None:
        await idx.process_routing_decision_for_request(TOKENS, 3)

    asyncio.run(route())
    assert idx.find_matches_for_request(TOKENS).scores == {(3, 0): 4}


def test_ttl_expiry() -> None:
    idx = ApproxKvIndexer(16, router_ttl_secs=1.0)
    idx.process_routing_decision_for_request(TOKENS, 1)
    assert idx.find_matches_for_request(TOKENS).scores == {(1, 0): 4}
    time.sleep(0.5)
    # A new routing touch of the first two blocks renews them only.
    idx.process_routing_decision_for_request(TOKENS[:32], 2)
    idx.process_routing_decision_for_request(TOKENS[:32], 1)
    time.sleep(0.6)  # past the first decision's TTL, within the second's
    assert idx.find_matches_for_request(TOKENS).scores == {(1, 0): 2, (2, 0): 2}
    time.sleep(0.6)
    assert idx.find_matches_for_request(TOKENS).scores == {}
    assert idx.current_size() == 0


def test_size_pruning() -> None:
    idx = ApproxKvIndexer(16, max_tree_size=8, prune_target_ratio=0.5)
    for w in range(4):
        idx.process_routing_decision_for_request(TOKENS, w)
        time.sleep(0.01)
    # 16 pairs recorded, pruned to 4 whenever past 8: the oldest decisions went first.
    assert idx.current_size() <= 8
    scores = idx.find_matches_for_request(TOKENS).scores
    assert scores.get((3, 0)) == 4
    assert (0, 0) not in scores


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="kv_block_size"):
        ApproxKvIndexer(0)
    with pytest.raises(ValueError, match="router_ttl_secs"):
        ApproxKvIndexer(16, router_ttl_secs=-1.0)
    with pytest.raises(ValueError, match="prune_target_ratio"):
        ApproxKvIndexer(16, prune_target_ratio=1.5)
    idx = ApproxKvIndexer(16)
    with pytest.raises(OverflowError, match=r"tokens\[0\]"):
        idx.process_routing_decision_for_request([-1] * 16, 1)
    with pytest.raises(OverflowError):
        idx.process_routing_decision_for_request(TOKENS, -1)
