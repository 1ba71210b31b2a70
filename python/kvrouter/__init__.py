"""kvrouter: KV-cache-aware routing for LLM inference fleets, from Python.

The names and return shapes follow NVIDIA Dynamo 1.6.1's ``dynamo.llm`` bindings, so code
written against them ports by changing the import. Everything runs in kvrouter's Rust core
(``kvrouter._core``); this package only re-exports it and declares the exception types.

* Hashing: :func:`compute_block_hash_for_seq` (Dynamo-compatible local block hashes) and
  :func:`compute_seq_hash_for_block` (their chained sequence hashes).
* Indexes: :class:`RadixTree` (exact, fed by KV events as JSON), :class:`ApproxKvIndexer`
  (approximate, fed by routing decisions), both answering :class:`OverlapScores`.
* Configuration: :class:`KvRouterConfig`, :class:`RouterConfig`, :class:`RouterMode`.
* Events: :class:`KvEventPublisher` publishes a custom engine's KV events in vLLM's ZMQ wire
  format (or relays an engine that already publishes), for a kvrouter frontend to subscribe.
* Routing: :class:`KvRouter` routes requests over a set of workers in this process (the
  standalone router's methods: ``generate``, ``best_worker``, ``get_potential_loads``,
  ``get_overlap_scores``, ``mark_prefill_complete``, ``free``, ``dump_events``).
* Errors: :mod:`kvrouter.exceptions`.

Example::

    from kvrouter import RadixTree, compute_block_hash_for_seq
    import json

    tree = RadixTree()
    hashes = compute_block_hash_for_seq(list(range(64)), 16)
    event = {"event_id": 0, "dp_rank": 0, "data": {"stored": {"parent_hash": None,
             "blocks": [{"block_hash": i, "tokens_hash": h} for i, h in enumerate(hashes)]}}}
    tree.apply_event(7, json.dumps(event).encode())
    tree.find_matches(hashes).scores   # {(7, 0): 4}
"""

from kvrouter._core import (
    ApproxKvIndexer,
    Completed,
    GenerateStream,
    KvEventPublisher,
    KvRouter,
    KvRouterConfig,
    OverlapScores,
    RadixTree,
    Ready,
    RouterConfig,
    RouterMode,
    __version__,
    compute_block_hash_for_seq,
    compute_seq_hash_for_block,
)
from kvrouter.exceptions import (
    AllWorkersBusy,
    BlockNotFound,
    InvalidBlockSequence,
    KvEventError,
    KvRouterError,
    ParentBlockNotFound,
    RouterQueueLimitExceeded,
    UnknownRequest,
    UnsupportedOption,
    WorkerError,
    WorkerUnavailable,
)

__all__ = [
    "__version__",
    "compute_block_hash_for_seq",
    "compute_seq_hash_for_block",
    "RadixTree",
    "ApproxKvIndexer",
    "OverlapScores",
    "Completed",
    "KvRouterConfig",
    "RouterConfig",
    "RouterMode",
    "KvEventPublisher",
    "KvRouter",
    "GenerateStream",
    "Ready",
    "KvRouterError",
    "KvEventError",
    "ParentBlockNotFound",
    "BlockNotFound",
    "InvalidBlockSequence",
    "UnsupportedOption",
    "WorkerUnavailable",
    "AllWorkersBusy",
    "RouterQueueLimitExceeded",
    "UnknownRequest",
    "WorkerError",
]
