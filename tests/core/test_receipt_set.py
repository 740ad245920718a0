"""ReceiptSet, the compiled set of receipts, against a Python set."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymq._core import ReceiptSet

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
# Few distinct values, so adds and discards hit the same receipts often.
SMALL = st.integers(min_value=0, max_value=300)


@given(st.lists(st.tuples(st.booleans(), st.one_of(SMALL, U64)), max_size=400))
def test_receipt_set_matches_python_set(operations: list[tuple[bool, int]]) -> None:
    receipts = ReceiptSet()
    model: set[int] = set()
    for adding, receipt in operations:
        if adding:
            receipts.add(receipt)
            model.add(receipt)
        else:
            assert receipts.discard(receipt) == (receipt in model)
            model.discard(receipt)
        assert len(receipts) == len(model)
    assert sorted(receipts) == sorted(model)
    for receipt in model:
        assert receipt in receipts


def test_receipt_set_collisions_survive_removal() -> None:
    # Keys that share their low 32 bits, as the receipts of one batch
    # nearly do, grow the table and share probe runs.
    keys = [(n << 32) | 0xABCD for n in range(1, 5001)]
    receipts = ReceiptSet()
    receipts.update(keys)
    assert len(receipts) == 5000
    receipts.difference_update(keys[::2])
    assert len(receipts) == 2500
    assert sorted(receipts) == keys[1::2]
    for key in keys[::2]:
        assert key not in receipts
    for key in keys[1::2]:
        assert key in receipts


def test_receipt_set_zero_and_largest() -> None:
    receipts = ReceiptSet()
    assert not receipts
    receipts.update([0, (1 << 64) - 1])
    assert bool(receipts)
    assert sorted(receipts) == [0, (1 << 64) - 1]
    assert receipts.discard(0) is True
    assert receipts.discard(0) is False
    assert list(receipts) == [(1 << 64) - 1]


def test_receipt_set_clear_then_reuse() -> None:
    receipts = ReceiptSet()
    receipts.update(range(1000))
    receipts.clear()
    assert len(receipts) == 0
    assert list(receipts) == []
    receipts.add(7)
    assert list(receipts) == [7]


def test_receipt_set_rejects_out_of_range() -> None:
    receipts = ReceiptSet()
    with pytest.raises(OverflowError):
        receipts.add(-1)
    with pytest.raises(OverflowError):
        receipts.add(1 << 64)
    assert -1 not in receipts
    assert "a" not in receipts
    assert len(receipts) == 0
