"""The cycle collector during a run (collector.py): paused while the task loads, what loaded frozen while the run
computes, everything as it was afterwards, and a caller's own collector settings left alone."""

import gc

import pytest

from influence_store import runs
from influence_store.store import Store
from tasks import small_breast_cancer_task


@pytest.fixture
def recorded(monkeypatch):
    """A run's task "loaded" by a stand-in for load_task that notes the collector's state, as does its loss on
    its first call (the computation)."""
    seen = {}
    task = small_breast_cancer_task()
    loss = task.loss

    def noting_loss(model, batch):
        seen.setdefault("computing", (gc.isenabled(), gc.get_freeze_count() > 0))
        return loss(model, batch)

    def load_task(spec, options):
        seen["loading"] = gc.isenabled()
        if spec == "fails":
            raise RuntimeError("the task failed to load")
        return task

    task.loss = noting_loss
    monkeypatch.setattr(runs, "load_task", load_task)
    return seen


def run(tmp_path, spec="tests/tasks.py:small"):
    return runs.execute_run(Store(str(tmp_path / "s.db")), spec, approximator="exact", self_influence=False)


def test_paused_while_loading_and_what_loaded_is_frozen_while_computing(recorded, tmp_path):
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert run(tmp_path).outcome == "computed"
    assert recorded == {"loading": False, "computing": (True, True)}
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_failed_load_leaves_the_collector_as_it_was(recorded, tmp_path):
    with pytest.raises(RuntimeError, match="failed to load"):
        run(tmp_path, "fails")
    assert recorded == {"loading": False}
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_process_that_disabled_the_collector_keeps_it_disabled(recorded, tmp_path):
    gc.disable()
    try:
        run(tmp_path)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
    assert recorded == {"loading": False, "computing": (False, False)}


def collected(thing) -> bool:
    """Whether the collector looks at ``thing`` (it is in a generation, not frozen)."""
    return any(o is thing for o in gc.get_objects())


def test_objects_the_process_froze_stay_frozen(recorded, tmp_path):
    mine = [[]]
    gc.freeze()
    try:
        assert not collected(mine)
        run(tmp_path)
        assert gc.isenabled() and not collected(mine)
    finally:
        gc.unfreeze()
    assert collected(mine)
    assert recorded == {"loading": True, "computing": (True, True)}


def test_a_run_inside_an_enclosing_pause_is_one_pause(recorded, tmp_path):
    """The CLI's ``run`` pauses the collector before it opens the store; execute_run inside keeps that pause, and
    the collector comes back once, when the outer block ends."""
    from influence_store import collector

    with collector.paused_for_run():
        assert not gc.isenabled()
        run(tmp_path)
        assert gc.isenabled() and gc.get_freeze_count() > 0  # frozen until the outer block ends
    assert recorded == {"loading": False, "computing": (True, True)}
    assert gc.isenabled() and gc.get_freeze_count() == 0
