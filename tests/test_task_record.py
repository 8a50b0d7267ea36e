"""TaskRecord construction: the submit path's `new_record` builds the same record."""

from __future__ import annotations

from taskprocessor.task import TaskRecord, TaskState, new_record


def _fields(record: TaskRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in TaskRecord.__slots__ if name != "id"}


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
    assert len(ids) == 2000
