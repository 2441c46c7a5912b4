"""The store's tables (SQLAlchemy 2 typed ORM). Alembic revisions in ``migrations/`` must match this file:
a new store is created from it, an older one migrated, and the two must be the same schema (columns that a
revision added come last, in its order; tests/test_migrations.py compares them).

One example keeps one identity across runs and model versions: a row of ``examples`` is
(dataset, key, content hash). Scores reference examples by id, never by position.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (CheckConstraint, Float, ForeignKey, Index, Integer, LargeBinary, MetaData,
                        PrimaryKeyConstraint, String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("pending", "running", "done", "failed")
PROPOSAL_STATUSES = ("proposed", "accepted", "rejected", "applied")


def utcnow() -> str:
    """ISO-8601 UTC timestamps as text: portable across SQLite and PostgreSQL, sortable."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_utc: Mapped[str] = mapped_column(String(40), default=utcnow)


class Example(Base):
    __tablename__ = "examples"
    __table_args__ = (UniqueConstraint("dataset_id", "key", "content_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    key: Mapped[str] = mapped_column(String(500))
    content_hash: Mapped[str] = mapped_column(String(64))
    label_json: Mapped[str | None] = mapped_column(Text)
    payload_json: Mapped[str] = mapped_column(Text)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"))
    created_utc: Mapped[str] = mapped_column(String(40), default=utcnow)
    notes: Mapped[str | None] = mapped_column(Text)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(f"status IN {RUN_STATUSES}", name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    train_dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    test_dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    task_spec: Mapped[str] = mapped_column(Text)
    task_options_json: Mapped[str] = mapped_column(Text, default="{}")
    approximator: Mapped[str] = mapped_column(String(100))
    options_json: Mapped[str] = mapped_column(Text)
    freeze: Mapped[str] = mapped_column(String(100))
    freeze_options_json: Mapped[str] = mapped_column(Text)
    tracked_fingerprint: Mapped[str] = mapped_column(String(64))
    num_params: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    effective_damping: Mapped[float] = mapped_column(Float)
    sign_convention: Mapped[str] = mapped_column(Text)
    versions_json: Mapped[str] = mapped_column(Text)
    device: Mapped[str] = mapped_column(String(40))
    settings_json: Mapped[str] = mapped_column(Text)
    settings_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    chunks_total: Mapped[int] = mapped_column(Integer)
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    created_utc: Mapped[str] = mapped_column(String(40), default=utcnow)
    started_utc: Mapped[str | None] = mapped_column(String(40))
    finished_utc: Mapped[str | None] = mapped_column(String(40))
    seconds_total: Mapped[float] = mapped_column(Float, default=0.0)
    seconds_writing: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    diagnostics_json: Mapped[str] = mapped_column(Text, default="{}")


class RunExample(Base):
    """Which examples a run saw, at which position, with their loss and self-influence."""

    __tablename__ = "run_examples"
    __table_args__ = (PrimaryKeyConstraint("run_id", "split", "position"),
                      CheckConstraint("split IN ('train', 'test')", name="split"),
                      Index("ix_run_examples_example", "example_id"))

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(5))
    position: Mapped[int] = mapped_column(Integer)
    example_id: Mapped[int] = mapped_column(ForeignKey("examples.id"))
    loss: Mapped[float] = mapped_column(Float)
    self_influence: Mapped[float | None] = mapped_column(Float)


class RunArtifact(Base):
    """A blob an approximator fitted for a run (e.g. EK-FAC factors), so a resumed run reuses it."""

    __tablename__ = "run_artifacts"
    __table_args__ = (PrimaryKeyConstraint("run_id", "name"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_utc: Mapped[str] = mapped_column(String(40), default=utcnow)


class RunChunk(Base):
    """Progress marker: a test chunk is done exactly when its row exists (committed with its scores)."""

    __tablename__ = "run_chunks"
    __table_args__ = (PrimaryKeyConstraint("run_id", "chunk_index"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    chunk_index: Mapped[int] = mapped_column(Integer)
    finished_utc: Mapped[str] = mapped_column(String(40), default=utcnow)


class RunClaim(Base):
    """A lease on one block of a run: the work queue that processes sharing a run claim from.

    Blocks ``0..chunks_total-1`` are test chunks (done exactly when their ``run_chunks`` row exists);
    negative blocks are the parts of the self-influence pass over the training set (``self_influence_block``;
    runs stored before parts existed have the one part ``SELF_INFLUENCE_BLOCK``). A block is free when
    its ``lease_expires`` (Unix seconds of the owner's clock) has passed: its owner died or let it go.
    """

    __tablename__ = "run_claims"
    __table_args__ = (PrimaryKeyConstraint("run_id", "block"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    block: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(200))  # host:pid:token of the last claimer
    lease_expires: Mapped[float] = mapped_column(Float, default=0.0)
    claims: Mapped[int] = mapped_column(Integer, default=0)  # > 1: claimed again after a lease ran out
    finished_utc: Mapped[str | None] = mapped_column(String(40))


SELF_INFLUENCE_BLOCK = -1  # the first part of a run's self-influence; part k is block -1 - k


def self_influence_block(part: int) -> int:
    """The claim block of self-influence part ``part`` (0, 1, ...)."""
    return SELF_INFLUENCE_BLOCK - part


def self_influence_part(block: int) -> int:
    """The self-influence part of a (negative) claim block."""
    return SELF_INFLUENCE_BLOCK - block


class ScoreBlock(Base):
    """Every score of one test example in a run: the training examples' scores in the run's training
    positions, as little-endian ``encoding`` ('<f4' when exact, else '<f8'). See score_layout.py."""

    __tablename__ = "score_blocks"
    __table_args__ = (PrimaryKeyConstraint("run_id", "test_example_id"),
                      CheckConstraint("encoding IN ('<f4', '<f8')", name="encoding"))

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    test_example_id: Mapped[int] = mapped_column(ForeignKey("examples.id"))
    encoding: Mapped[str] = mapped_column(String(3))
    scores: Mapped[bytes] = mapped_column(LargeBinary)


class ScoreExtreme(Base):
    """Per test example, its most helpful and most harmful training examples, ranked (rank 1 = strongest).

    No foreign keys: the rows are derived from a chunk whose ids the writer checked, and PostgreSQL would
    check every key of every row with a trigger query (migration 0007)."""

    __tablename__ = "score_extremes"
    __table_args__ = (PrimaryKeyConstraint("run_id", "test_example_id", "side", "rank"),
                      CheckConstraint("side IN ('helpful', 'harmful')", name="side"),
                      {"sqlite_with_rowid": False})

    run_id: Mapped[int] = mapped_column(Integer)
    test_example_id: Mapped[int] = mapped_column(Integer)
    side: Mapped[str] = mapped_column(String(7))
    rank: Mapped[int] = mapped_column(Integer)
    train_example_id: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)


class TrainAggregate(Base):
    """Per training example, over the test examples stored so far: count, sum, min, max, how many it hurts."""

    __tablename__ = "train_aggregates"
    __table_args__ = (PrimaryKeyConstraint("run_id", "train_example_id"), {"sqlite_with_rowid": False})

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    train_example_id: Mapped[int] = mapped_column(ForeignKey("examples.id"))
    n_test: Mapped[int] = mapped_column(Integer)
    sum_score: Mapped[float] = mapped_column(Float)
    min_score: Mapped[float] = mapped_column(Float)
    max_score: Mapped[float] = mapped_column(Float)
    hurts: Mapped[int] = mapped_column(Integer)


class Proposal(Base):
    __tablename__ = "proposals"
    __table_args__ = (CheckConstraint(f"status IN {PROPOSAL_STATUSES}", name="status"),
                      Index("ix_proposals_example", "example_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    example_id: Mapped[int] = mapped_column(ForeignKey("examples.id"))
    rule: Mapped[str] = mapped_column(String(100))
    rule_options_json: Mapped[str] = mapped_column(Text)
    rank: Mapped[int] = mapped_column(Integer)
    evidence_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="proposed")
    reviewer: Mapped[str | None] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)
    applied_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created_utc: Mapped[str] = mapped_column(String(40), default=utcnow)
    updated_utc: Mapped[str] = mapped_column(String(40), default=utcnow)
    new_label_json: Mapped[str | None] = mapped_column(Text)  # set: accepted as a relabel, not a removal


class ProposalEvent(Base):
    """Every status change of a proposal: who, when, why."""

    __tablename__ = "proposal_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    proposal_id: Mapped[int] = mapped_column(ForeignKey("proposals.id"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)
    created_utc: Mapped[str] = mapped_column(String(40), default=utcnow)
    new_label_json: Mapped[str | None] = mapped_column(Text)  # the label a relabel decision gave


class Verification(Base):
    """A retraining without accepted removals: predicted vs actual change of the test loss."""

    __tablename__ = "verifications"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    proposal_ids_json: Mapped[str] = mapped_column(Text)
    n_removed: Mapped[int] = mapped_column(Integer)
    predicted_loss_change: Mapped[float] = mapped_column(Float)
    actual_loss_change: Mapped[float] = mapped_column(Float)
    loss_before: Mapped[float] = mapped_column(Float)
    loss_after: Mapped[float] = mapped_column(Float)
    accuracy_before: Mapped[float | None] = mapped_column(Float)
    accuracy_after: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(200))
    created_utc: Mapped[str] = mapped_column(String(40), default=utcnow)
    n_relabelled: Mapped[int] = mapped_column(Integer, server_default="0")
