"""The store as a work queue: processes that share a run claim its blocks with leases.

Part of the store (it speaks SQL); ``Store`` inherits these verbs. One row of ``run_claims`` per block.
Claiming is one short write transaction: on PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` lets many
claimers pass each other without waiting; on SQLite the store's ``BEGIN IMMEDIATE`` serializes them.
A test block is done exactly when its ``run_chunks`` row exists, which ``write_chunk`` commits with the
block's scores, so a block is stored once even when its lease ran out and someone else computed it too.
Lease times are Unix seconds from each claimer's clock (keep the clocks of a cluster in sync).
"""

from __future__ import annotations

import json
import time
from typing import Sequence

from sqlalchemy import case, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .schema import Run, RunChunk, RunClaim, utcnow


class BlockClaimVerbs:
    """Claim, renew, finish and release blocks of a run (mixed into ``Store``)."""

    def add_blocks(self, run_id: int, blocks: Sequence[int]) -> None:
        """Create the claim rows that do not exist yet (a run may have been started before claims existed)."""
        with self._session() as s:
            known = set(s.scalars(select(RunClaim.block).where(RunClaim.run_id == run_id)))
            new = [b for b in blocks if b not in known]
            if new:  # processes that join at once add the same rows: the first one wins, the others skip them
                dialect = {"postgresql": postgresql, "sqlite": sqlite}.get(s.bind.dialect.name)
                insert = dialect.insert(RunClaim).on_conflict_do_nothing() if dialect else RunClaim.__table__.insert()
                s.execute(insert, [
                    {"run_id": run_id, "block": b, "owner": None, "lease_expires": 0.0, "claims": 0} for b in new])

    def claim_block(self, run_id: int, owner: str, lease_seconds: float,
                    within: tuple[int, int] | None = None) -> tuple[int | None, float | None]:
        """Claim the next free block (``within`` an inclusive range, if given): ``(block, None)``;
        ``(None, seconds)`` when every unfinished block is leased by others (the soonest lease ends in
        ``seconds``); ``(None, None)`` when all are finished or the rest are this owner's own."""
        now = time.time()
        unfinished = (RunClaim.run_id == run_id, RunClaim.finished_utc.is_(None), ~exists().where(
            RunChunk.run_id == RunClaim.run_id, RunChunk.chunk_index == RunClaim.block))
        free = (RunClaim.lease_expires < now,) + (() if within is None else (RunClaim.block.between(*within),))
        with self._session() as s:
            block = s.scalar(select(RunClaim.block).where(*unfinished, *free)
                             .order_by(case((RunClaim.block < 0, 1), else_=0), RunClaim.block).limit(1)
                             .with_for_update(skip_locked=True))
            if block is not None:
                s.execute(update(RunClaim).where(RunClaim.run_id == run_id, RunClaim.block == block).values(
                    owner=owner, lease_expires=now + lease_seconds, claims=RunClaim.claims + 1))
                # A run marked failed by a process that stopped is running again once anyone works on it.
                s.execute(update(Run).where(Run.id == run_id, Run.status.in_(("pending", "failed")))
                          .values(status="running", error=None))
                return block, None
            # Blocks this owner holds are its own to finish (computed, perhaps being written): not a reason to wait.
            others = or_(RunClaim.owner.is_(None), RunClaim.owner != owner)
            soonest = s.scalar(select(func.min(RunClaim.lease_expires)).where(*unfinished, others))
            return None, (None if soonest is None else max(0.0, soonest - now))

    def renew_leases(self, run_id: int, owner: str, lease_seconds: float) -> int:
        """Extend this owner's unfinished leases (the heartbeat); returns how many it holds."""
        with self._session() as s:
            return s.execute(update(RunClaim).where(
                RunClaim.run_id == run_id, RunClaim.owner == owner, RunClaim.finished_utc.is_(None),
                RunClaim.lease_expires > 0).values(lease_expires=time.time() + lease_seconds)).rowcount

    def finish_block(self, run_id: int, block: int) -> None:
        with self._session() as s:
            s.execute(update(RunClaim).where(RunClaim.run_id == run_id, RunClaim.block == block)
                      .values(finished_utc=utcnow()))

    def release_blocks(self, run_id: int, owner: str) -> None:
        """Give this owner's unfinished blocks back at once (a process that stops), instead of at lease end."""
        with self._session() as s:
            s.execute(update(RunClaim).where(RunClaim.run_id == run_id, RunClaim.owner == owner,
                                             RunClaim.finished_utc.is_(None)).values(lease_expires=0.0))

    def run_workers(self, run_id: int) -> list[str]:
        """Owners (host:pid:token) holding an unexpired lease on an unfinished block of the run."""
        with self._session(read=True) as s:
            return live_owners(s, run_id)

    def complete_run(self, run_id: int, seconds: float, diagnostics: dict, self_influence: bool) -> bool:
        """Mark the run done if every block is stored and nobody did yet; True for the process that did."""
        with self._session() as s:
            run = s.get(Run, run_id, with_for_update=True)  # two finishers: one waits, then sees done
            if run.status == "done":
                return False
            stored = s.scalar(select(func.count()).select_from(RunChunk).where(RunChunk.run_id == run_id))
            pending_self = self_influence and s.scalar(select(func.count()).select_from(RunClaim).where(
                RunClaim.run_id == run_id, RunClaim.block < 0, RunClaim.finished_utc.is_(None)))
            if stored < run.chunks_total or pending_self:
                return False
            run.status, run.finished_utc, run.error = "done", utcnow(), None
            run.seconds_total = (run.seconds_total or 0.0) + seconds
            run.diagnostics_json = json.dumps(diagnostics, default=str)
            return True


def live_owners(session: Session, run_id: int) -> list[str]:
    """Owners with an unexpired lease on an unfinished block of the run: the processes working on it now."""
    return sorted(session.scalars(select(RunClaim.owner).where(
        RunClaim.run_id == run_id, RunClaim.finished_utc.is_(None), RunClaim.lease_expires > time.time()).distinct()))
