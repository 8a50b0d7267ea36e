from __future__ import annotations

import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskprocessor import PayloadError, TaskProcessor
from taskprocessor.payload import find_unplain

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_json_values_are_plain(value: Any) -> None:
    """Anything JSON can represent exactly passes the check."""
    assert find_unplain(value) is None


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({1: "a"}, "[1]: a int key"),
        ([{"when": datetime.date(2026, 1, 1)}], "[0]['when']: date"),
        ({"s": {1, 2}}, "['s']: set"),
        (b"bytes", "value: bytes"),
    ],
)
def test_unplain_values_are_located(value: object, where: str) -> None:
    """The check names the path and type of the first value that is not plain data."""
    found = find_unplain(value)
    assert found is not None
    assert where in found


def test_deep_nesting_is_rejected_not_a_recursion_error() -> None:
    """A pathologically nested value is refused with a message, never a RecursionError."""
    value: list[Any] = []
    for _ in range(500):
        value = [value]
    found = find_unplain(value)
    assert found is not None
    assert "nested deeper" in found


async def test_submit_rejects_int_dict_keys_with_the_path() -> None:
    """Dict keys json.dumps would silently stringify are refused at submit, naming the path."""
    app = TaskProcessor()

    @app.task
    async def use(mapping: dict[str, int]) -> None:
        return None

    with pytest.raises(PayloadError, match=r"kwargs\['mapping'\]\[1\]"):
        await use.submit(mapping={1: 2})
