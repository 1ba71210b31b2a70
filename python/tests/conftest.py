"""Fixtures of the kvrouter package tests (helpers are in `helpers.py`)."""

from typing import Iterator

import pytest
import zmq


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
