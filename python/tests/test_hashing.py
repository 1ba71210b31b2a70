"""compute_block_hash_for_seq / compute_seq_hash_for_block: the reference's test vectors
(dynamo-router-spec.md Appendix A, verified with Dynamo 1.6.1), argument errors, and every
input path of the int reader giving the same hashes."""

import array
import platform
import random
from typing import Any, List, Sequence

import pytest

import kvrouter
from kvrouter import compute_block_hash_for_seq, compute_seq_hash_for_block

B0 = 16863443419780771464
B1 = 2287610619914608821


def toks(a: int, b: int) -> List[int]:
    return list(range(a, b + 1))


def test_appendix_a_plain_and_partial_tail() -> None:
    assert compute_block_hash_for_seq(toks(1, 32), 16) == [B0, B1]
    assert compute_block_hash_for_seq(toks(1, 39), 16) == [B0, B1]
    assert compute_block_hash_for_seq(toks(1, 64), 16) == [
        B0,
        B1,
        12129935312930971799,
        5453111288643762282,
    ]
    assert compute_block_hash_for_seq(toks(1, 15), 16) == []
    assert compute_block_hash_for_seq([], 16) == []


def test_appendix_a_lora_and_namespace() -> None:
    assert compute_block_hash_for_seq(toks(1, 32), 16, lora_name="my-lora") == [
        4148081000444450790,
        2866551892415683476,
    ]
    assert compute_block_hash_for_seq(toks(1, 32), 16, cache_namespace="ns1") == [
        10470563794485058852,
        9596755744098040008,
    ]
    # Empty strings count as absent.
    assert compute_block_hash_for_seq(toks(1, 32), 16, lora_name="", cache_namespace="") == [B0, B1]


def test_appendix_a_multimodal() -> None:
    infos = [{"mm_objects": [{"mm_hash": 0xDEADBEEF, "offsets": [[0, 4]]}]}, None]
    assert compute_block_hash_for_seq(toks(1, 32), 16, block_mm_infos=infos) == [
        14529151895984176542,
        B1,
    ]
    # Offsets are not hashed, and may be left out.
    no_offsets = [{"mm_objects": [{"mm_hash": 0xDEADBEEF}]}]
    assert compute_block_hash_for_seq(toks(1, 32), 16, no_offsets)[0] == 14529151895984176542
    # Several objects hash in sorted order.
    a = [{"mm_objects": [{"mm_hash": 5}, {"mm_hash": 1}]}]
    b = [{"mm_objects": [{"mm_hash": 1}, {"mm_hash": 5}]}]
    assert compute_block_hash_for_seq(toks(1, 16), 16, a) == compute_block_hash_for_seq(toks(1, 16), 16, b)


def test_appendix_a_eagle() -> None:
    assert compute_block_hash_for_seq(toks(1, 32) + [99], 16, is_eagle=True) == [
        6752489653130089168,
        8646629551596238458,
    ]
    assert len(compute_block_hash_for_seq(toks(1, 32), 16, is_eagle=True)) == 1


def test_appendix_a_sequence_hashes() -> None:
    local = compute_block_hash_for_seq(toks(1, 64), 16)
    assert compute_seq_hash_for_block(local) == [
        B0,
        12466389667045779788,
        960926348267535642,
        4923844688253642376,
    ]
    assert compute_seq_hash_for_block([]) == []


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="kv_block_size"):
        compute_block_hash_for_seq(toks(1, 32), 0)
    with pytest.raises(OverflowError, match=r"tokens\[2\] = -3"):
        compute_block_hash_for_seq([1, 2, -3], 2)
    with pytest.raises(OverflowError, match=r"tokens\[1\] = 4294967296"):
        compute_block_hash_for_seq([1, 2**32], 2)
    with pytest.raises(TypeError, match=r"tokens\[0\] must be an int, not float"):
        compute_block_hash_for_seq([1.0, 2], 2)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"tokens\[1\] must be an int, not str"):
        compute_block_hash_for_seq((1, "2"), 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of ints, not str"):
        compute_block_hash_for_seq("abc", 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of ints, not int"):
        compute_block_hash_for_seq(5, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="block_mm_infos"):
        compute_block_hash_for_seq(toks(1, 16), 16, [{"mm_objects": [{"mm_hash": "x"}]}])
    with pytest.raises(OverflowError):
        compute_seq_hash_for_block([-1])


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="CPython layouts only")
def test_fast_list_reader_is_on() -> None:
    # The direct list reader checked its layout at import (see python/src/ints.rs).
    assert kvrouter._core._fast_int_layout() in ("legacy", "tagged")


class Seq:
    """A sequence that is neither a list nor a tuple (the generic path)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class Index:
    """An int-like object (`__index__`), as NumPy scalars are."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __index__(self) -> int:
        return self.v

    def __int__(self) -> int:
        return self.v


def test_every_input_path_hashes_the_same() -> None:
    rng = random.Random(7)
    edge = [0, 1, 255, 256, 2**30 - 1, 2**30, 2**30 + 1, 2**31, 2**32 - 1]
    tokens = edge + [rng.randrange(2**32) for _ in range(16 * 64 - len(edge))]
    want = compute_block_hash_for_seq(tokens, 16)
    assert len(want) == 64
    assert compute_block_hash_for_seq(tuple(tokens), 16) == want
    assert compute_block_hash_for_seq(array.array("Q", tokens), 16) == want
    assert compute_block_hash_for_seq(Seq(tokens), 16) == want  # type: ignore[arg-type]
    # Items the direct reader leaves to Python's rules: int subclasses and __index__ objects.
    mixed: List[Any] = list(tokens)
    mixed[3] = True if tokens[3] == 1 else Index(tokens[3])
    mixed[100] = Index(tokens[100])
    assert compute_block_hash_for_seq(mixed, 16) == want
    # Large hashes (three 30-bit digits) through every path.
    hashes = [rng.randrange(2**64) for _ in range(200)] + [0, 2**60 - 1, 2**60, 2**64 - 1]
    want_seq = compute_seq_hash_for_block(hashes)
    assert compute_seq_hash_for_block(tuple(hashes)) == want_seq
    assert compute_seq_hash_for_block(Seq(hashes)) == want_seq  # type: ignore[arg-type]
    with pytest.raises(OverflowError, match=r"block_hashes\[1\]"):
        compute_seq_hash_for_block([1, 2**64])


def test_odd_items_at_every_offset() -> None:
    # Token ids below 2**30 go four at a time; an item of another kind (two digits, a bool, an
    # __index__ object) at any offset must give the same hashes as the item-by-item path.
    rng = random.Random(11)
    base = [rng.randrange(150_000) for _ in range(16 * 8)]
    odd: List[Any] = [2**30 + 7, 2**32 - 1, True, Index(5)]
    for pos in range(12):
        for o in odd:
            tokens: List[Any] = list(base)
            for k in range(pos, len(tokens), 37):
                tokens[k] = o
            want = compute_block_hash_for_seq(tuple(int(t) if isinstance(t, Index) else t for t in tokens), 16)
            assert compute_block_hash_for_seq(tokens, 16) == want, (pos, o)


def test_a_list_changed_by_index_keeps_its_new_contents() -> None:
    # An __index__ that mutates the list: the reader must re-read the list after running it.
    tokens: List[Any] = list(range(32))

    class Shrink:
        def __index__(self) -> int:
            del tokens[20:]
            return 5

    tokens[4] = Shrink()
    # 5 replaced item 4, the list now has 20 items: one block of 16.
    assert compute_block_hash_for_seq(tokens, 16) == compute_block_hash_for_seq(
        [0, 1, 2, 3, 5] + list(range(5, 16)), 16
    )
