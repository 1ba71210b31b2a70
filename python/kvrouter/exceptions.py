"""Exceptions raised by kvrouter.

Every kvrouter-specific error derives from :class:`KvRouterError`, and also from the built-in
exception that NVIDIA Dynamo's bindings raise in the same situation, so code written against
``dynamo.llm`` (``except RuntimeError``, ``except ValueError``) keeps working. Invalid arguments
(wrong types, malformed JSON, out-of-range values) raise the built-in ``TypeError``,
``ValueError`` or ``OverflowError``.
"""

__all__ = [
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


class KvRouterError(Exception):
    """Base class of kvrouter's own errors."""


class KvEventError(KvRouterError, RuntimeError):
    """A well-formed KV event that the index cannot apply (Dynamo: ``RuntimeError("Failed to
    apply event: ...")``)."""


class ParentBlockNotFound(KvEventError):
    """A stored event names a parent block this worker rank does not hold: the whole store is
    skipped."""


class BlockNotFound(KvEventError):
    """A removed event names blocks this worker rank does not hold; the known ones were
    removed."""


class InvalidBlockSequence(KvEventError):
    """A stored event whose parent is one of its own blocks, or that repeats a block hash: it
    is skipped."""


class UnsupportedOption(KvRouterError, ValueError):
    """A configuration field of Dynamo's API that kvrouter does not implement was given a value
    other than its default (which is what kvrouter does)."""


class WorkerUnavailable(KvRouterError, RuntimeError):
    """No worker can take the request: none is registered or healthy, or the worker a request
    names is gone."""


class AllWorkersBusy(KvRouterError, RuntimeError):
    """Every worker is past a busy threshold."""


class RouterQueueLimitExceeded(AllWorkersBusy):
    """Every worker is busy and the router queue is full."""


class UnknownRequest(KvRouterError, KeyError):
    """A request id the router does not know (never booked, already freed or expired)."""


class WorkerError(KvRouterError, RuntimeError):
    """The worker a request was sent to failed it: an error status, a timeout, or a stream
    broken mid-way (``KvRouter.generate``). The message has the router's request id; the
    router's log has the details under it."""
