"""TaskRecord construction: the submit path's `new_record` builds the same record."""

from __future__ import annotations

import pytest

from taskprocessor.task import TaskRecord, TaskState, id_index, new_record, new_task_id

_RARE = ("key", "headers", "eta", "expires_at", "dead_letter_reason", "admission_pass")


def _fields(record: TaskRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in TaskRecord.__slots__ if name != "_id"}


def test_new_record_sets_every_field_as_the_constructor_does() -> None:
    """new_record leaves no slot unset and sets each one as TaskRecord(...) does."""
    args, kwargs = (1, "a"), {"k": 2}
    built = TaskRecord("job", args, kwargs, priority=75, queue="q", timeout=2.5, ttl=9.0)
    fast = new_record("job", args, kwargs, 75, "q", 2.5, 9.0)
    assert _fields(fast) == _fields(built)
    assert fast.state is TaskState.QUEUED


def test_new_record_ids_are_fresh_and_unique() -> None:
    """Each record gets its own id, from the same sequence as the constructor's."""
    ids = {new_record("job", (), {}, 50, "default", None, None).id for _ in range(1000)}
    ids |= {TaskRecord("job", (), {}).id for _ in range(1000)}
    ids.add(new_task_id())
    assert len(ids) == 2001


def test_an_id_reads_back_as_it_was_given() -> None:
    """Any id given to a record (this process's form or another) reads back unchanged."""
    own = new_task_id()
    prefix = own[: own.index("-") + 1]
    for task_id in (own, "abc", "", f"{prefix}007", f"{prefix}-1", f"{prefix}1x", f"{prefix}٣"):
        record = TaskRecord("job", (), {}, task_id=task_id)
        assert record.id == task_id
        assert id_index(task_id) == record._id
        record.id = own
        assert record.id == own


def test_own_ids_are_indexed_by_their_number() -> None:
    """An id made here is held as its counter; the id string is made only when read."""
    record = new_record("job", (), {}, 50, "default", None, None)
    assert isinstance(record._id, int)
    assert id_index(record.id) == record._id
    assert id_index(f"{record.id}0") != record._id


def test_rare_fields_default_to_none_and_cost_nothing_until_set() -> None:
    """The rare fields read None (sort_key -priority) with no side object made."""
    record = TaskRecord("job", (), {}, priority=75)
    assert [getattr(record, name) for name in _RARE] == [None] * len(_RARE)
    assert record.sort_key == -75
    for name in _RARE:
        setattr(record, name, None)
    record.sort_key = -75
    assert record._rare is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("key", "k"),
        ("headers", {"traceparent": "x"}),
        ("eta", 1.5),
        ("expires_at", 2.5),
        ("dead_letter_reason", "gave up"),
        ("admission_pass", object()),
        ("sort_key", 3.25),
    ],
)
def test_a_rare_field_keeps_what_is_written(name: str, value: object) -> None:
    """A rare field reads back what was written, and None again once reset."""
    record = TaskRecord("job", (), {})
    setattr(record, name, value)
    assert getattr(record, name) is value
    assert all(getattr(record, other) is None for other in _RARE if other != name)
    if name != "sort_key":
        setattr(record, name, None)
        assert getattr(record, name) is None


def test_constructor_takes_key_and_headers() -> None:
    """key= and headers= land in the rare fields."""
    record = TaskRecord("job", (), {}, key="k", headers={"a": "b"})
    assert (record.key, record.headers) == ("k", {"a": "b"})
