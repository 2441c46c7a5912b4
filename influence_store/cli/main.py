"""The root click group with the built-in commands (``commands.py``); plugins add theirs through
``register_commands``."""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import InfluenceStoreError
from .commands import BUILT_IN_COMMANDS
from .wording import cli_message


class CLIGroup(click.Group):
    """Turns every failure into one line on stderr and exit code 1 (set INFLUENCE_STORE_DEBUG=1 for tracebacks)."""

    def invoke(self, ctx):
        try:
            self._load_plugin_dirs(ctx.params.get("plugins_dir") or ())
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except InfluenceStoreError as exc:
            raise click.ClickException(cli_message(exc)) from None
        except BrokenPipeError:  # `influence-store ... | head`: the reader left, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
        except Exception as exc:
            if os.environ.get("INFLUENCE_STORE_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise click.ClickException(f"{type(exc).__name__}: {message} (set INFLUENCE_STORE_DEBUG=1 for details)") \
                from None

    def _load_plugin_dirs(self, directories) -> None:
        """Load ``--plugins-dir`` files before the subcommand is resolved, so they can add commands too."""
        if not directories:
            return
        from ..plugin_manager import call_hook, load_plugins_dir

        for directory in directories:
            load_plugins_dir(directory)
        call_hook("register_commands", cli=self)  # re-adding an existing command replaces it: harmless


@click.group(cls=CLIGroup)
@click.version_option(__version__, prog_name="influence-store")
@click.option("--plugins-dir", type=click.Path(file_okay=False), multiple=True, envvar=None,
              help="Load every *.py file in this folder as a plugin (repeatable).")
@click.option("--db", default=None, metavar="PATH|URL",
              help="Store location for every command (default: $INFLUENCE_STORE_DB or ./influence-store.db).")
def cli(plugins_dir, db):
    """Find the training examples that hurt a model, record why, and track their removal."""
    # plugins_dir is loaded by CLIGroup.invoke, before the subcommand is looked up


for command in BUILT_IN_COMMANDS:
    cli.add_command(command)


def main() -> None:
    from ..plugin_manager import call_hook

    try:
        call_hook("register_commands", cli=cli)
    except InfluenceStoreError as exc:
        click.echo(f"Error: {cli_message(exc)}", err=True)
        sys.exit(1)
    try:
        cli(prog_name="influence-store")
    finally:
        _before_exit()


def _before_exit() -> None:
    """Close the stores this command opened, then spare the exit the garbage collector's passes over every
    object that torch (and AllenNLP) created: they cost about 2 s of a command's time, and the process is
    ending anyway. Objects are still freed and finalizers (atexit, weakref.finalize) still run."""
    import gc

    store_connection = sys.modules.get("influence_store.store_connection")  # loaded only if a store was opened
    if store_connection is not None:
        store_connection.close_all_stores()
    gc.freeze()
