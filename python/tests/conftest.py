"""Fixtures of the kvrouter package tests (helpers are in `helpers.py`)."""

from typing import Iterator

import pytest
import zmq

from helpers import Mocker


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def mocker() -> Iterator[Mocker]:
    """Two mock workers (block size 16) for the module's tests, ids 1 and 2."""
    m = Mocker(2, 16)
    for i, w in enumerate(m.workers):
        w["id"] = i + 1
    yield m
    m.close()
