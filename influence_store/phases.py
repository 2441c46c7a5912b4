"""Long steps name themselves: one line per phase on stderr with its elapsed time.

Loading a task can train a model for half a minute and an exact Hessian can take as long, so a
command that would otherwise sit silent says which phase it is in and how long it took; a phase that
ends within a few seconds says nothing. Progress bars are for terminals only; these lines also read
well in a CI log.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator


ANNOUNCE_AFTER = 3.0  # seconds: quicker steps stay silent, so short commands print only their result
ANNOUNCE_ENV = "INFLUENCE_STORE_PHASE_SECONDS"  # overrides it (the tests silence phases with a large value)


def announce_after() -> float:
    try:
        return float(os.environ.get(ANNOUNCE_ENV) or ANNOUNCE_AFTER)
    except ValueError:
        return ANNOUNCE_AFTER


class Phases:
    """``with phases.step("loading task"):`` prints ``loading task ...`` once the step has taken
    ``announce_after()`` seconds, and then ``loading task: 31.2 s`` when it ends."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stderr, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        began, lock, state = time.perf_counter(), threading.Lock(), {"announced": False, "over": False}

        def announce() -> None:
            with lock:
                if not state["over"]:
                    state["announced"] = True
                    self.say(f"{name} ...")

        timer = threading.Timer(announce_after(), announce)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            with lock:
                state["over"] = True
                if state["announced"]:
                    self.say(f"{name}: {time.perf_counter() - began:.1f} s")


def bars_wanted(progress: bool) -> bool:
    """Progress bars redraw a line, which only a terminal shows well."""
    return progress and sys.stderr.isatty()


QUIET = Phases(enabled=False)
