"""``influence-store serve``: the review page in a browser."""

from __future__ import annotations

import click

from .common import db_option, open_store


@click.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: only this machine can open the page).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--reviewer", default=None, help="Name decisions carry until the page sets one "
                                               "(default: $INFLUENCE_STORE_USER or the OS user).")
@click.option("--with-task", is_flag=True, help="Render with the tasks' own render(example): loads each run's task "
                                                "once (which may train its model) instead of reading stored payloads.")
def serve(db, host, port, reviewer, with_task):
    """Review proposals in a browser: each example rendered next to its evidence, accept, relabel or
    reject with a note (keyboard: j/k, a, l, r, u, n). Decisions are stored as with `review`.

    Example: influence-store serve --port 8765
    """
    from ..web import serve as run_server

    store = open_store(db, write=True)

    def ready(server):
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"serving {store.location} at http://{shown}:{server.server_port}/ (Ctrl+C to stop)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            click.echo("warning: listening beyond this machine; anyone who reaches it can review", err=True)

    try:
        run_server(store, host, port, reviewer, with_task, ready)
    except KeyboardInterrupt:
        click.echo("stopped")
