"""One process's leases on the blocks of a run: claim the next block, keep the claims alive, let go.

Every launcher (one process, several started by hand or by SLURM, Dask workers) runs this same loop
against the store, which is the work queue. A background thread renews this process's leases every
third of the lease time, so a block is taken over by another process only when its owner stopped
renewing: it died, was killed, or lost the database. A process that stops releases its blocks at once.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import Iterator

from .errors import InfluenceStoreError

DEFAULT_LEASE_SECONDS = 60.0


def owner_name() -> str:
    """host:pid:token, unique per process and readable in `runs show` (which host, which process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class BlockLeases:
    """Use as a context manager around the loop over ``blocks()``."""

    def __init__(self, store, run_id: int, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        if not lease_seconds > 0:
            raise InfluenceStoreError(f"lease must be a positive number of seconds, got {lease_seconds}")
        self.store, self.run_id, self.lease_seconds = store, run_id, float(lease_seconds)
        self.owner = owner_name()
        self.claimed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="influence-store-lease", daemon=True)

    def __enter__(self) -> "BlockLeases":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.store.release_blocks(self.run_id, self.owner)
        except Exception:  # the database is gone too: the leases run out by themselves
            if exc[0] is None:
                raise

    def blocks(self, grid=None) -> Iterator[list[int]]:
        """Claim blocks until none is left, a group at a time: with ``grid`` (block -> the inclusive range
        of blocks computed together with it), the first free block and then the other free blocks of its
        range. While the rest are leased by others, wait for them to finish (or for a lease to run out,
        then take that block over)."""
        while True:
            block, wait = self.store.claim_block(self.run_id, self.owner, self.lease_seconds)
            if block is None:
                if wait is None:
                    return
                time.sleep(min(wait + 0.05, 1.0))
                continue
            claimed = [block]
            while grid is not None and block >= 0:  # the rest of its group that is free right now
                block, _ = self.store.claim_block(self.run_id, self.owner, self.lease_seconds, grid(claimed[0]))
                if block is None:
                    break
                claimed.append(block)
            self.claimed.extend(claimed)
            yield claimed

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.store.renew_leases(self.run_id, self.owner, self.lease_seconds)
            except Exception:  # a passing database hiccup: try again at the next beat
                pass
