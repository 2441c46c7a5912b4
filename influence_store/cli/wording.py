"""How the CLI spells the settings that core error messages name (see ``InfluenceStoreError``)."""

from __future__ import annotations

from ..errors import InfluenceStoreError

# setting named in a core message -> its flag or command, as a template over the error's facts
FLAGS = {
    "allow_removed": "--allow-removed",
    "device": "--device cpu",
    # where the store is
    "with_db": "with --db",
    "db_path": "--db path",
    "init": "`influence-store init`",
    "db_upgrade": "`influence-store db upgrade`",
    # runs
    "model_version": "--model-version NEW",
    "run_version": "`influence-store run TASK --model-version {version}`",
    "resume": "influence-store run TASK --resume {run_id}",
    "runs_list": "`influence-store runs list`",
    "approximator_lissa": "-a lissa",
    "approximator_exact": "-a exact",
    "freeze_pattern": "--freeze regex -f patterns '{pattern}'",
    "module_names": "-f names classifier",
    "train_mode": "--model-mode train",
    "eval_mode": "--model-mode eval",
    "freeze_all": "--freeze all",
    "freeze_fewer": "--freeze last-layer / regex / modules",
    "with_self_influence": "without --no-self-influence",
    "data_path": "--{split}-data PATH (or -t {split}_data PATH)",
    # options of an approximator or a rule
    "more_damping": "-o damping {damping:.3g}",
    "fisher_empirical": "-o fisher empirical",
    "scale_number": "-o scale NUMBER",
    "larger_scale": "-o scale {larger:g}",
    "auto_scale": "-o scale auto",
    "by_option": "-o by",
    # curation
    "top": "--top",
    "force": "--force",
    "new_version": "--version",
    "versions_add": "`influence-store versions add`",
    "versions_list": "`influence-store versions list`",
    "proposals_list": "`influence-store proposals list`",
}


def cli_message(exc: InfluenceStoreError) -> str:
    return exc.worded(FLAGS)
