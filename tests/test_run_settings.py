"""One RunSettings value carries a run's settings: resolved once, fingerprinted from itself, rebuilt from the
store on resume. A store written before it existed opens, finds its runs, and resumes them."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

import influence_store as ist
from influence_store.runs import execute_run
from influence_store.store import Store

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from legacy_task import task as legacy_task  # noqa: E402


@pytest.fixture
def legacy_store(tmp_path):
    """Written by the code before RunSettings: run 1 done (lissa, train mode, no self-influence), run 2
    interrupted after the first of four chunks (exact, damping 1e-3, chunks of 5)."""
    path = tmp_path / "legacy.db"
    shutil.copy(DATA / "store_before_run_settings.db", path)
    return Store(str(path))


def test_a_finished_run_of_an_older_store_is_found_by_the_same_settings(legacy_store):
    again = execute_run(legacy_store, legacy_task(), approximator="lissa", model_mode="train",
                        self_influence=False, dataset="digits-legacy")
    assert (again.run_id, again.outcome) == (1, "existing")
    other = execute_run(legacy_store, legacy_task(), approximator="lissa", self_influence=False,
                        dataset="digits-legacy")  # eval mode: another run
    assert other.outcome == "computed" and other.run_id == 3


def test_an_interrupted_run_of_an_older_store_resumes_with_its_stored_settings(legacy_store):
    result = execute_run(legacy_store, legacy_task(), resume=2)
    assert (result.run_id, result.outcome) == (2, "resumed")
    run = legacy_store.run(2)
    assert run["status"] == "done" and run["chunks_done"] == run["chunks_total"] == 4
    expected = ist.compute_scores(legacy_task(), "exact", {"damping": 1e-3}).matrix()
    stored = torch.tensor(legacy_store.score_matrix(2))
    assert torch.allclose(stored, expected, rtol=1e-6, atol=1e-9 * expected.abs().max())
