"""Hooks that plugins implement. Each receives a ``register`` callable (or the CLI group)."""

import pluggy

hookspec = pluggy.HookspecMarker("influence_store")
hookimpl = pluggy.HookimplMarker("influence_store")


@hookspec
def register_approximators(register):
    """Register inverse-HVP approximator classes: ``register(ApproximatorClass)``."""


@hookspec
def register_freezing_policies(register):
    """Register freezing policy classes that choose the tracked parameters: ``register(PolicyClass)``."""


@hookspec
def register_task_loaders(register):
    """Register task loader classes that turn a task spec into a Task: ``register(LoaderClass)``."""


@hookspec
def register_proposal_rules(register):
    """Register proposal rule classes that turn stored scores into removal proposals: ``register(RuleClass)``."""


@hookspec
def register_commands(cli):
    """Add extra click commands or groups to the ``influence-store`` CLI group ``cli``."""
