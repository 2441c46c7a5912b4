"""One RunSettings value carries a run's settings: resolved once, fingerprinted from itself, rebuilt from the
store on resume. A store written before it existed opens, finds its runs, and resumes them."""

import shutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import influence_store as ist
from influence_store.runs import execute_run
from influence_store.settings import RunSettings
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


def test_every_setting_is_stored_with_the_run_and_rebuilt_from_it(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    settings = RunSettings(approximator="exact", options={"damping": "0.002"}, freeze="last-layer", seed=3,
                           dtype="float32", memory_budget_mb=300, test_chunk_size=7, self_influence=False,
                           model_mode="train")
    result = execute_run(store, legacy_task(), settings)
    assert RunSettings.from_run(store.run(result.run_id)) == settings.resolved()
    assert execute_run(store, legacy_task(), settings.resolved()).outcome == "existing"
    assert execute_run(store, legacy_task(), settings, seed=4).run_id != result.run_id


def test_every_setting_is_an_option_of_the_run_command():
    from click.testing import CliRunner

    from influence_store.cli.main import cli

    usage = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200).output
    for f in fields(RunSettings):
        assert f.metadata["flags"] and all(flag in usage for flag in f.metadata["flags"]), f.name


def test_an_unknown_or_bad_setting_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(TypeError, match="unknown run setting 'modelmode'"):
        execute_run(Store(str(tmp_path / "s.db")), legacy_task(), modelmode="train")
    with pytest.raises(ist.InfluenceStoreError, match="test chunk size must be a positive number"):
        RunSettings(test_chunk_size=0)


def test_an_edited_loss_or_a_value_it_reads_starts_a_new_run(tmp_path):
    """The loss's code and the simple values it closes over (a task option, say) are part of a run's identity:
    an edited loss never reports the old scores."""
    from dataclasses import replace

    store = Store(str(tmp_path / "s.db"))
    task = legacy_task()
    first = execute_run(store, task, approximator="exact", self_influence=False)
    assert execute_run(store, legacy_task(), approximator="exact", self_influence=False).outcome == "existing"

    def doubled(model, batch, inner=task.loss):
        return 2 * inner(model, batch)

    edited = execute_run(store, replace(task, loss=doubled), approximator="exact", self_influence=False)
    assert edited.outcome == "computed" and edited.run_id != first.run_id
    assert not torch.allclose(torch.tensor(store.score_matrix(edited.run_id)),
                              torch.tensor(store.score_matrix(first.run_id)))  # the old scores were not reused

    def weighted(weight):  # as a task function would build its loss from a -t option
        return lambda model, batch, inner=task.loss: float(weight) * inner(model, batch)

    heavier = execute_run(store, replace(task, loss=weighted("3")), approximator="exact", self_influence=False)
    assert heavier.run_id not in (first.run_id, edited.run_id)
    again = execute_run(store, replace(task, loss=weighted("3")), approximator="exact", self_influence=False)
    assert (again.run_id, again.outcome) == (heavier.run_id, "existing")


def test_a_code_fingerprint_follows_the_code_and_the_values_it_closes_over():
    from influence_store.runs import code_fingerprint

    def scaled(factor):
        return lambda model, batch: factor * model(batch)

    assert code_fingerprint(scaled(2)) == code_fingerprint(scaled(2))
    assert code_fingerprint(scaled(2)) != code_fingerprint(scaled(3))
    assert code_fingerprint(lambda m, b: 2 * m(b)) != code_fingerprint(lambda m, b: 3 * m(b))
