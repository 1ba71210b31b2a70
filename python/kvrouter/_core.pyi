"""Typed interface of kvrouter's Rust extension (``kvrouter._core``); import from ``kvrouter``."""

from types import TracebackType
from typing import (
    Any,
    Awaitable,
    Dict,
    Generic,
    Generator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    final,
)
from os import PathLike


__all__ = [
    "ApproxKvIndexer",
    "Completed",
    "GenerateStream",
    "KvEventPublisher",
    "KvRouter",
    "KvRouterConfig",
    "OverlapScores",
    "RadixTree",
    "Ready",
    "RouterConfig",
    "RouterMode",
    "__version__",
    "_fast_int_layout",
    "compute_block_hash_for_seq",
    "compute_seq_hash_for_block",
]

__version__: str

#: A per-block multimodal description: ``None`` or
#: ``{"mm_objects": [{"mm_hash": int, "offsets": [[start, end], ...]}]}`` (offsets optional).
_BlockMmInfo = Optional[Mapping[str, Any]]

def compute_block_hash_for_seq(
    tokens: Sequence[int],
    kv_block_size: int,
    block_mm_infos: Optional[Sequence[_BlockMmInfo]] = None,
    lora_name: Optional[str] = None,
    is_eagle: Optional[bool] = None,
    cache_namespace: Optional[str] = None,
) -> List[int]:
    """Local block hashes of the full blocks of ``tokens`` (a trailing partial block is not
    hashed), bit-compatible with Dynamo 1.6.1: XXH3-64, seed 1337, tokens as little-endian
    u32; ``lora_name`` and ``cache_namespace`` change the seed; ``block_mm_infos[i]`` adds the
    sorted ``mm_hash`` values of block i; ``is_eagle`` hashes windows of ``kv_block_size + 1``
    tokens with stride ``kv_block_size``.

    Raises ``ValueError`` if ``kv_block_size`` is 0, ``TypeError`` / ``OverflowError`` for
    tokens that are not ints in ``0 <= t < 2**32``.
    """

def compute_seq_hash_for_block(block_hashes: Sequence[int]) -> List[int]:
    """Sequence hashes of a chain of local block hashes from the sequence start:
    ``seq[0] = local[0]``, ``seq[i] = XXH3-64(LE(seq[i-1]) || LE(local[i]), 1337)``."""

def _fast_int_layout() -> Optional[str]:
    """Which int layout the fast list reader uses (``"legacy"``, ``"tagged"``), or None."""

@final
class OverlapScores:
    """How many contiguous leading blocks of a query each ``(worker_id, dp_rank)`` holds."""

    @property
    def scores(self) -> Dict[Tuple[int, int], int]:
        """``{(worker_id, dp_rank): matched_blocks}``; ranks holding none are absent."""
    @property
    def frequencies(self) -> List[int]:
        """Per-depth access counts: always empty (kvrouter does not track them)."""
    def __len__(self) -> int: ...

@final
class RadixTree:
    """Exact prefix index of the blocks each worker rank holds, fed by KV events (Dynamo's
    ``RadixTree``). Thread-safe; the GIL is released while it works."""

    def __new__(cls) -> "RadixTree": ...
    def find_matches(self, sequence: Sequence[int], early_exit: bool = False) -> OverlapScores:
        """Longest contiguous prefix of ``sequence`` (local block hashes) held by each rank.
        With ``early_exit`` the walk stops once a single rank is left."""
    def apply_event(self, worker_id: int, kv_cache_event_bytes: Union[bytes, str]) -> None:
        """Applies one JSON KV event of ``worker_id``: a ``KvCacheEvent``
        ``{"event_id", "data": {"stored": {"parent_hash", "blocks": [{"block_hash",
        "tokens_hash"}]}} | {"removed": {"block_hashes"}} | "cleared", "dp_rank"}`` or a whole
        ``RouterEvent`` of that worker (as ``dump_tree_as_events`` returns).

        Raises ``ValueError`` for malformed JSON; ``ParentBlockNotFound``, ``BlockNotFound``,
        ``InvalidBlockSequence`` (``KvEventError``, a ``RuntimeError``) when the index rejects
        the event.
        """
    def remove_worker(self, worker_id: int) -> None:
        """Drops every block of every dp rank of the worker and forgets it."""
    def clear_all_blocks(self, worker_id: int) -> None:
        """Drops every block of every dp rank of the worker."""
    def dump_tree_as_events(self) -> List[str]:
        """The index as JSON ``RouterEvent`` strings that rebuild it when applied in order."""
    def current_size(self) -> int:
        """Number of ``(block, worker rank)`` pairs held."""

@final
class Completed:
    """Returned by ``ApproxKvIndexer.process_routing_decision_for_request``: the work is done;
    awaiting it returns None at once."""

    def __await__(self) -> Generator[Any, None, None]: ...
    def __iter__(self) -> "Completed": ...
    def __next__(self) -> None: ...

@final
class ApproxKvIndexer:
    """Approximate index for engines without KV events: blocks of routed requests are assumed
    cached on the chosen rank for ``router_ttl_secs`` after their last routing touch (Dynamo's
    ``ApproxKvIndexer``). Above ``max_tree_size`` ``(block, worker)`` pairs the oldest are
    dropped down to ``prune_target_ratio`` of it. Thread-safe."""

    def __new__(
        cls,
        kv_block_size: int,
        router_ttl_secs: float = 120.0,
        *,
        max_tree_size: int = 1048576,
        prune_target_ratio: float = 0.8,
    ) -> "ApproxKvIndexer": ...
    def find_matches_for_request(
        self,
        token_ids: Sequence[int],
        lora_name: Optional[str] = None,
        is_eagle: Optional[bool] = None,
    ) -> OverlapScores:
        """Overlap of the request's full blocks with what each rank is assumed to hold."""
    def process_routing_decision_for_request(
        self,
        tokens: Sequence[int],
        worker_id: int,
        dp_rank: int = 0,
        *,
        lora_name: Optional[str] = None,
        is_eagle: Optional[bool] = None,
    ) -> Completed:
        """Records that the request was routed to ``(worker_id, dp_rank)``. Done on return;
        may be awaited (Dynamo's method is ``async``)."""
    def remove_worker(self, worker_id: int) -> None:
        """Forgets the worker's blocks on every dp rank."""
    def block_size(self) -> int: ...
    def current_size(self) -> int:
        """Number of ``(block, worker rank)`` pairs held (expired ones dropped first)."""

_PrefillLoadModel = Literal["none", "aic", "ais"]
_QueuePolicy = Literal["fcfs", "wspt"]
_SelectionPolicy = Literal["default", "lmetric", "affinity"]
_PrefillCoefficients = Union[Tuple[float, float, float], Mapping[str, float]]

@final
class KvRouterConfig:
    """KV routing parameters (Dynamo's ``KvRouterConfig``): every field of Dynamo 1.6.1 that
    kvrouter implements, with Dynamo's defaults, plus kvrouter's own (after ``*`` below the
    Dynamo ones). Fields of Dynamo's that kvrouter does not implement are accepted only at the
    value that turns them off (what kvrouter does); any other value raises
    ``UnsupportedOption`` naming the field. Unknown fields raise ``TypeError``. Immutable:
    ``with_overrides`` returns a changed copy."""

    def __new__(
        cls,
        *,
        overlap_score_weight: Optional[float] = None,
        host_cache_hit_weight: float = 0.75,
        disk_cache_hit_weight: float = 0.25,
        router_temperature: float = 0.0,
        use_kv_events: bool = True,
        router_replica_sync: Literal[False] = False,
        router_track_active_blocks: bool = True,
        router_track_output_blocks: Literal[False] = False,
        router_assume_kv_reuse: bool = True,
        router_track_prefill_tokens: bool = True,
        router_prefill_load_model: _PrefillLoadModel = "none",
        router_ttl_secs: float = 120.0,
        router_approximate_cache_policy: Literal["ttl"] = "ttl",
        router_queue_threshold: Optional[float] = None,
        router_event_threads: Literal[4] = 4,
        router_queue_policy: _QueuePolicy = "fcfs",
        use_remote_indexer: Literal[False] = False,
        serve_indexer: Literal[False] = False,
        enable_session_prefix_index: Literal[False] = False,
        shared_cache_multiplier: None = None,
        shared_cache_type: Literal["none"] = "none",
        router_predicted_ttl_secs: Optional[float] = None,
        conditional_disagg_enabled: Literal[False] = False,
        conditional_disagg_policy: Literal["isl_bounding"] = "isl_bounding",
        conditional_disagg_eff_isl_threshold: Literal[2048] = 2048,
        conditional_disagg_eff_isl_ratio_threshold: float = 0.7,
        conditional_disagg_prefill_busy_threshold: None = None,
        conditional_disagg_decode_busy_threshold: None = None,
        overlap_score_credit: float = 1.0,
        overlap_score_credit_decay: float = 0.0,
        prefill_load_scale: float = 1.0,
        decode_active_request_weight: float = 0.0,
        router_policy_config: None = None,
        router_prefill_policy: None = None,
        router_decode_policy: None = None,
        router_tracking_hash: Literal["public-xxh3-v1"] = "public-xxh3-v1",
        router_tracking_key_file: None = None,
        router_tracking_key_id: None = None,
        router_max_tree_size: int = 1048576,
        router_prune_target_ratio: float = 0.8,
        router_active_request_expiry_secs: float = 300.0,
        router_selection_policy: _SelectionPolicy = "default",
        router_affinity_load_factor: float = 2.0,
        router_prefill_time_coefficients: Optional[_PrefillCoefficients] = None,
        router_queue_limit: int = 4096,
        router_overlap_refresh_after_secs: float = 10.0,
    ) -> "KvRouterConfig": ...
    @classmethod
    def from_json(cls, json: str) -> "KvRouterConfig":
        """A config from a JSON object of fields (missing ones take their defaults). Unknown
        fields raise ``ValueError``, unsupported values ``UnsupportedOption``."""
    def to_json(self) -> str:
        """kvrouter's fields as a JSON object (``from_json`` reads it back)."""
    def to_dict(self) -> Dict[str, Any]:
        """kvrouter's fields as a dict."""
    def copy(self) -> "KvRouterConfig": ...
    def __copy__(self) -> "KvRouterConfig": ...
    def __deepcopy__(self, memo: Any) -> "KvRouterConfig": ...
    def with_overrides(
        self,
        *,
        overlap_score_weight: Optional[float] = ...,
        host_cache_hit_weight: float = ...,
        disk_cache_hit_weight: float = ...,
        router_temperature: float = ...,
        use_kv_events: bool = ...,
        router_replica_sync: Literal[False] = ...,
        router_track_active_blocks: bool = ...,
        router_track_output_blocks: Literal[False] = ...,
        router_assume_kv_reuse: bool = ...,
        router_track_prefill_tokens: bool = ...,
        router_prefill_load_model: _PrefillLoadModel = ...,
        router_ttl_secs: float = ...,
        router_approximate_cache_policy: Literal["ttl"] = ...,
        router_queue_threshold: Optional[float] = ...,
        router_event_threads: Literal[4] = ...,
        router_queue_policy: _QueuePolicy = ...,
        use_remote_indexer: Literal[False] = ...,
        serve_indexer: Literal[False] = ...,
        enable_session_prefix_index: Literal[False] = ...,
        shared_cache_multiplier: None = ...,
        shared_cache_type: Literal["none"] = ...,
        router_predicted_ttl_secs: Optional[float] = ...,
        conditional_disagg_enabled: Literal[False] = ...,
        conditional_disagg_policy: Literal["isl_bounding"] = ...,
        conditional_disagg_eff_isl_threshold: Literal[2048] = ...,
        conditional_disagg_eff_isl_ratio_threshold: float = ...,
        conditional_disagg_prefill_busy_threshold: None = ...,
        conditional_disagg_decode_busy_threshold: None = ...,
        overlap_score_credit: float = ...,
        overlap_score_credit_decay: float = ...,
        prefill_load_scale: float = ...,
        decode_active_request_weight: float = ...,
        router_policy_config: None = ...,
        router_prefill_policy: None = ...,
        router_decode_policy: None = ...,
        router_tracking_hash: Literal["public-xxh3-v1"] = ...,
        router_tracking_key_file: None = ...,
        router_tracking_key_id: None = ...,
        router_max_tree_size: int = ...,
        router_prune_target_ratio: float = ...,
        router_active_request_expiry_secs: float = ...,
        router_selection_policy: _SelectionPolicy = ...,
        router_affinity_load_factor: float = ...,
        router_prefill_time_coefficients: Optional[_PrefillCoefficients] = ...,
        router_queue_limit: int = ...,
        router_overlap_refresh_after_secs: float = ...,
    ) -> "KvRouterConfig":
        """A copy with the given fields changed (checked as the constructor checks them)."""
    # Field values (read-only).
    @property
    def overlap_score_weight(self) -> Optional[float]: ...
    @property
    def host_cache_hit_weight(self) -> float: ...
    @property
    def disk_cache_hit_weight(self) -> float: ...
    @property
    def router_temperature(self) -> float: ...
    @property
    def use_kv_events(self) -> bool: ...
    @property
    def router_track_active_blocks(self) -> bool: ...
    @property
    def router_assume_kv_reuse(self) -> bool: ...
    @property
    def router_track_prefill_tokens(self) -> bool: ...
    @property
    def router_prefill_load_model(self) -> Literal["none", "aic"]: ...
    @property
    def router_ttl_secs(self) -> float: ...
    @property
    def router_queue_threshold(self) -> Optional[float]: ...
    @property
    def router_queue_policy(self) -> _QueuePolicy: ...
    @property
    def router_predicted_ttl_secs(self) -> Optional[float]: ...
    @property
    def overlap_score_credit(self) -> float: ...
    @property
    def overlap_score_credit_decay(self) -> float: ...
    @property
    def prefill_load_scale(self) -> float: ...
    @property
    def decode_active_request_weight(self) -> float: ...
    @property
    def router_max_tree_size(self) -> int: ...
    @property
    def router_prune_target_ratio(self) -> float: ...
    @property
    def router_active_request_expiry_secs(self) -> float: ...
    @property
    def router_selection_policy(self) -> _SelectionPolicy: ...
    @property
    def router_affinity_load_factor(self) -> float: ...
    @property
    def router_prefill_time_coefficients(self) -> Optional[Dict[str, float]]: ...
    @property
    def router_queue_limit(self) -> int: ...
    @property
    def router_overlap_refresh_after_secs(self) -> float: ...
    # Dynamo fields kvrouter does not implement: always their "off" value.
    @property
    def router_replica_sync(self) -> Literal[False]: ...
    @property
    def router_track_output_blocks(self) -> Literal[False]: ...
    @property
    def router_approximate_cache_policy(self) -> Literal["ttl"]: ...
    @property
    def router_event_threads(self) -> int: ...
    @property
    def use_remote_indexer(self) -> Literal[False]: ...
    @property
    def serve_indexer(self) -> Literal[False]: ...
    @property
    def enable_session_prefix_index(self) -> Literal[False]: ...
    @property
    def shared_cache_multiplier(self) -> None: ...
    @property
    def shared_cache_type(self) -> Literal["none"]: ...
    @property
    def conditional_disagg_enabled(self) -> Literal[False]: ...
    @property
    def conditional_disagg_policy(self) -> str: ...
    @property
    def conditional_disagg_eff_isl_threshold(self) -> int: ...
    @property
    def conditional_disagg_eff_isl_ratio_threshold(self) -> float: ...
    @property
    def conditional_disagg_prefill_busy_threshold(self) -> None: ...
    @property
    def conditional_disagg_decode_busy_threshold(self) -> None: ...
    @property
    def router_policy_config(self) -> None: ...
    @property
    def router_prefill_policy(self) -> None: ...
    @property
    def router_decode_policy(self) -> None: ...
    @property
    def router_tracking_hash(self) -> str: ...
    @property
    def router_tracking_key_file(self) -> None: ...
    @property
    def router_tracking_key_id(self) -> None: ...

@final
class RouterMode:
    """How a worker is chosen (Dynamo's ``RouterMode``)."""

    RoundRobin: "RouterMode"
    Random: "RouterMode"
    PowerOfTwoChoices: "RouterMode"
    KV: "RouterMode"
    Direct: "RouterMode"
    LeastLoaded: "RouterMode"
    DeviceAwareWeighted: "RouterMode"
    @staticmethod
    def from_str(name: str) -> "RouterMode":
        """The mode from its CLI name (``"kv"``, ``"round-robin"``, ``"power-of-two"``, ...)."""
    def __int__(self) -> int: ...
    def __hash__(self) -> int: ...

@final
class RouterConfig:
    """The mode, the KV parameters and the busy thresholds (Dynamo's ``RouterConfig``).
    ``enforce_disagg``, ``session_affinity_ttl_secs`` and ``session_affinity_mode`` are accepted
    at their defaults only (``UnsupportedOption`` otherwise)."""

    def __new__(
        cls,
        mode: RouterMode = ...,
        config: Optional[KvRouterConfig] = None,
        active_decode_blocks_threshold: Optional[float] = None,
        active_prefill_tokens_threshold: Optional[int] = None,
        active_prefill_tokens_threshold_frac: Optional[float] = None,
        enforce_disagg: Literal[False] = False,
        session_affinity_ttl_secs: None = None,
        session_affinity_mode: Literal["hard"] = "hard",
        *,
        device_ratio: float = 8.0,
    ) -> "RouterConfig": ...
    @property
    def mode(self) -> RouterMode: ...
    @property
    def config(self) -> KvRouterConfig: ...
    @property
    def active_decode_blocks_threshold(self) -> Optional[float]: ...
    @property
    def active_prefill_tokens_threshold(self) -> Optional[int]: ...
    @property
    def active_prefill_tokens_threshold_frac(self) -> Optional[float]: ...
    @property
    def enforce_disagg(self) -> bool: ...
    @property
    def session_affinity_ttl_secs(self) -> Optional[float]: ...
    @property
    def session_affinity_mode(self) -> str: ...
    @property
    def device_ratio(self) -> float: ...
    def copy(self) -> "RouterConfig": ...

@final
class KvEventPublisher:
    """Publishes a custom engine's KV events in vLLM's ZMQ wire format: a PUB socket sending
    ``[topic, seq (8-byte big-endian), msgpack KVEventBatch]`` and a replay ROUTER serving the
    last ``buffer_steps`` batches, so that a kvrouter frontend subscribes to it as to a vLLM
    worker (``kv_events_endpoint`` / ``replay_endpoint`` of its worker entry). Each ``publish_*``
    call is one batch with the next sequence number; arguments are checked before anything is
    published.

    With ``zmq_endpoint`` it also relays the engine publishing there: each batch (any vLLM or
    SGLang version) is normalised (events of other KV groups, remote locality or another block
    size dropped; our dp rank set) and republished; upstream gaps are replayed from
    ``zmq_replay_endpoint`` or republished as ``AllBlocksCleared``.

    ``endpoint`` and ``replay_endpoint`` are where our sockets bind (port 0: a free port; read
    the actual addresses back from the properties). Data-parallel rank ``r`` of a worker is
    expected on the worker's base port + r.

    With ``nats_server`` (``nats://host:port``) everything published also goes to the NATS
    event plane: the JetStream stream of ``nats_endpoint`` (``namespace.component.endpoint``),
    as ``kvrouter relay`` publishes a worker's events, for routers started with
    ``--event-plane nats``; ``worker_id`` must be the id the routers register the worker
    under. NATS may come up later (events wait in a bounded buffer); ``shutdown`` publishes
    what is buffered first. Rank 0 only (``ValueError`` otherwise).
    """

    def __new__(
        cls,
        worker_id: int,
        kv_block_size: int,
        dp_rank: int = 0,
        zmq_endpoint: Optional[str] = None,
        zmq_topic: Optional[str] = None,
        *,
        endpoint: str = "tcp://127.0.0.1:0",
        replay_endpoint: Optional[str] = "tcp://127.0.0.1:0",
        topic: str = "",
        buffer_steps: int = 10000,
        zmq_replay_endpoint: Optional[str] = None,
        zmq_bind: bool = False,
        nats_server: Optional[str] = None,
        nats_endpoint: str = "dynamo.backend.generate",
    ) -> "KvEventPublisher": ...
    def publish_stored(
        self,
        token_ids: Sequence[int],
        num_block_tokens: Union[int, Sequence[int]],
        block_hashes: Sequence[int],
        parent_hash: Optional[int] = None,
        *,
        lora_name: Optional[str] = None,
        cache_salt: Optional[str] = None,
        block_mm_infos: Optional[Sequence[_BlockMmInfo]] = None,
        is_eagle: Optional[bool] = None,
    ) -> int:
        """Publishes newly cached full blocks as one ``BlockStored``: ``block_hashes[i]`` is
        block i's engine hash (signed or unsigned 64-bit), ``parent_hash`` the block before the
        first (None at the sequence start), ``token_ids`` all their tokens
        (``len(block_hashes) * kv_block_size``, one more with ``is_eagle``),
        ``num_block_tokens`` the tokens per block (one int, or one per block: each must be
        ``kv_block_size``). The arguments after ``parent_hash`` are keyword-only: Dynamo's
        order of them differs, and a positional call must not pass one for another. Returns
        the batch's sequence number.

        Raises ``ValueError`` (counts that do not match, a repeated hash, a parent among the
        blocks), ``TypeError`` (not ints) or ``OverflowError`` (out of range) before
        publishing; ``RuntimeError`` after ``shutdown``.
        """
    def publish_removed(self, block_hashes: Sequence[int]) -> int:
        """Publishes evicted blocks by engine hash as one ``BlockRemoved``. Returns the batch's
        sequence number."""
    def publish_cleared(self) -> int:
        """Publishes ``AllBlocksCleared``. Returns the batch's sequence number."""
    def publish_batch(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Publishes several events as one batch, in order: dicts with ``"type"``
        ``"stored"`` (and ``publish_stored``'s arguments as keys), ``"removed"``
        (``"block_hashes"``) or ``"cleared"``. All are checked before anything is published.
        Returns the batch's sequence number."""
    def shutdown(self) -> None:
        """Stops the relay and closes the sockets (idempotent)."""
    def __enter__(self) -> "KvEventPublisher": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    @property
    def endpoint(self) -> str:
        """The PUB socket's address (actual port)."""
    @property
    def replay_endpoint(self) -> Optional[str]:
        """The replay ROUTER's address, or None when replay is off."""
    @property
    def topic(self) -> str: ...
    @property
    def worker_id(self) -> int: ...
    @property
    def dp_rank(self) -> int: ...
    @property
    def kv_block_size(self) -> int: ...
    @property
    def next_seq(self) -> Optional[int]:
        """The sequence number the next batch will get (None after ``shutdown``)."""
    def relay_stats(self) -> Optional[Dict[str, int]]:
        """Relay counters (None when not relaying): ``received``, ``published``,
        ``filtered_events``, ``dropped_batches``, ``bad_messages``, ``gaps``, ``recovered``,
        ``cleared``, ``restarts``."""

_T = TypeVar("_T")

#: A worker in the workers-file schema: ``{"url": str, "kv_events_endpoint"?: str,
#: "replay_endpoint"?: str, "block_size"?: int, "dp_size"?: int, "model"?: str, "id"?: int,
#: "endpoint"?: str, ...}`` (the JSON lines ``kvrouter mocker`` prints are valid).
_WorkerSpec = Mapping[str, Any]

@final
class Ready(Generic[_T]):
    """What ``KvRouter``'s routing calls return: the call is done; awaiting it returns its
    value (or raises its error) at once."""

    def __await__(self) -> Generator[Any, None, _T]: ...
    def __iter__(self) -> "Ready[_T]": ...
    def __next__(self) -> None: ...

@final
class GenerateStream:
    """The output of ``KvRouter.generate``: an async iterator of chunk dicts
    ``{"token_ids": [int], "text": str, "finish_reason": None | str, "usage": None | dict}``.
    Leaving it early (``break`` and releasing it, or ``await stream.aclose()``) frees the
    request's load."""

    @property
    def worker_id(self) -> int: ...
    @property
    def dp_rank(self) -> int: ...
    @property
    def request_id(self) -> str: ...
    def __aiter__(self) -> "GenerateStream": ...
    def __anext__(self) -> Awaitable[Dict[str, Any]]: ...
    def aclose(self) -> Awaitable[None]: ...

@final
class KvRouter:
    """A KV-aware router over a set of workers, in this process (Dynamo's ``KvRouter``).
    Workers from ``workers`` and/or ``workers_file``; ``endpoint`` selects those serving it.
    Close it with ``close()`` or a ``with`` block."""

    def __new__(
        cls,
        endpoint: Optional[str] = None,
        block_size: Optional[int] = None,
        kv_router_config: Optional[KvRouterConfig] = None,
        *,
        workers: Optional[Sequence[_WorkerSpec]] = None,
        workers_file: Optional[Union[str, "PathLike[str]"]] = None,
        router_config: Optional[RouterConfig] = None,
    ) -> "KvRouter": ...
    @property
    def block_size(self) -> int: ...
    @property
    def endpoint(self) -> Optional[str]: ...
    @property
    def closed(self) -> bool: ...
    def workers(self) -> List[Dict[str, Any]]:
        """The registered workers (workers-file schema, with their ``id``)."""
    def generate(
        self,
        token_ids: Sequence[int],
        model: Optional[str],
        stop_conditions: Optional[Mapping[str, Any]] = None,
        sampling_options: Optional[Mapping[str, Any]] = None,
        output_options: Optional[Mapping[str, Any]] = None,
        router_config_override: Optional[Mapping[str, Any]] = None,
        worker_id: Optional[int] = None,
        dp_rank: Optional[int] = None,
    ) -> Awaitable[GenerateStream]:
        """Route, book and send the request; its output chunks as a ``GenerateStream``."""
    def best_worker(
        self,
        token_ids: Sequence[int],
        router_config_override: Optional[Mapping[str, Any]] = None,
        request_id: Optional[str] = None,
        *,
        lora_name: Optional[str] = None,
        cache_salt: Optional[str] = None,
    ) -> Ready[Tuple[int, int, int]]:
        """``(worker_id, dp_rank, overlap_blocks)``; books the request with ``request_id``."""
    def get_potential_loads(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: Optional[str] = None,
        cache_salt: Optional[str] = None,
    ) -> Ready[List[Dict[str, int]]]:
        """Per rank: ``worker_id``, ``dp_rank``, ``potential_prefill_tokens``,
        ``potential_decode_blocks``, ``active_requests``."""
    def get_overlap_scores(
        self,
        token_ids: Sequence[int],
        router_config_override: Optional[Mapping[str, Any]] = None,
        *,
        lora_name: Optional[str] = None,
        include_shared: bool = True,
        cache_salt: Optional[str] = None,
    ) -> Ready[Dict[str, Any]]:
        """``{"block_size", "num_blocks", "shared_cache", "workers": [{"worker_id", "dp_rank",
        "device", "host_pinned", "disk", "shared"}]}``."""
    def mark_prefill_complete(self, request_id: str) -> Ready[None]: ...
    def free(self, request_id: str) -> Ready[None]: ...
    def dump_events(self) -> Ready[str]:
        """The exact index as a JSON array of router events."""
    def close(self) -> None: ...
    def __enter__(self) -> "KvRouter": ...
    def __exit__(self, *_args: object) -> Literal[False]: ...
