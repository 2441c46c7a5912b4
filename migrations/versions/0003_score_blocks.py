"""Scores as one block per (run, test example), with ranked extremes and per-training-example aggregates.

Moves every row of ``scores`` into ``score_blocks`` (bit for bit), fills ``score_extremes`` and
``train_aggregates`` from the same numbers, then drops ``scores``. The conversion is written out here
(not imported) so this revision keeps doing what it did when it landed.

Revision ID: 0003_score_blocks
Revises: 0002
Create Date: 2026-12-01
"""
from itertools import groupby

import numpy as np
import sqlalchemy as sa
from alembic import op

from influence_store.errors import InfluenceStoreError

revision = '0003_score_blocks'
down_revision = '0002'
branch_labels = None
depends_on = None

EXTREMES_PER_SIDE = 100


def upgrade() -> None:
    op.create_table('score_blocks',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('test_example_id', sa.Integer(), nullable=False),
    sa.Column('encoding', sa.String(length=3), nullable=False),
    sa.Column('scores', sa.LargeBinary(), nullable=False),
    sa.CheckConstraint("encoding IN ('<f4', '<f8')", name=op.f('ck_score_blocks_encoding')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_score_blocks_run_id_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['test_example_id'], ['examples.id'],
                            name=op.f('fk_score_blocks_test_example_id_examples')),
    sa.PrimaryKeyConstraint('run_id', 'test_example_id', name=op.f('pk_score_blocks'))
    )
    if op.get_bind().dialect.name == "postgresql":  # blobs of scores do not compress: skip TOAST's attempt
        op.execute("ALTER TABLE score_blocks ALTER COLUMN scores SET STORAGE EXTERNAL")
    op.create_table('score_extremes',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('test_example_id', sa.Integer(), nullable=False),
    sa.Column('side', sa.String(length=7), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('train_example_id', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.CheckConstraint("side IN ('helpful', 'harmful')", name=op.f('ck_score_extremes_side')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_score_extremes_run_id_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['test_example_id'], ['examples.id'],
                            name=op.f('fk_score_extremes_test_example_id_examples')),
    sa.ForeignKeyConstraint(['train_example_id'], ['examples.id'],
                            name=op.f('fk_score_extremes_train_example_id_examples')),
    sa.PrimaryKeyConstraint('run_id', 'test_example_id', 'side', 'rank', name=op.f('pk_score_extremes')),
    sqlite_with_rowid=False
    )
    op.create_table('train_aggregates',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('train_example_id', sa.Integer(), nullable=False),
    sa.Column('n_test', sa.Integer(), nullable=False),
    sa.Column('sum_score', sa.Float(), nullable=False),
    sa.Column('min_score', sa.Float(), nullable=False),
    sa.Column('max_score', sa.Float(), nullable=False),
    sa.Column('hurts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_train_aggregates_run_id_runs'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['train_example_id'], ['examples.id'],
                            name=op.f('fk_train_aggregates_train_example_id_examples')),
    sa.PrimaryKeyConstraint('run_id', 'train_example_id', name=op.f('pk_train_aggregates')),
    sqlite_with_rowid=False
    )
    connection = op.get_bind()
    for (run_id,) in connection.execute(sa.text("SELECT DISTINCT run_id FROM scores ORDER BY run_id")).all():
        _convert_run(connection, run_id)
    op.drop_table('scores')


def _smallest(keys, k):
    candidates = np.arange(len(keys))
    return candidates[np.argsort(keys, kind="stable")][:k]


def _convert_run(connection, run_id: int) -> None:
    train_ids = [e for (e,) in connection.execute(sa.text(
        "SELECT example_id FROM run_examples WHERE run_id = :r AND split = 'train' ORDER BY position"), {"r": run_id})]
    position = {e: i for i, e in enumerate(train_ids)}
    train = np.asarray(train_ids, dtype=np.int64)
    rows = connection.execute(sa.text("SELECT test_example_id, train_example_id, score FROM scores WHERE run_id = :r "
                                      "ORDER BY test_example_id, train_example_id"), {"r": run_id})
    totals = None
    for test_id, group in groupby(rows, key=lambda r: r[0]):
        values = np.full(len(train_ids), np.nan)
        for _, train_id, score in group:
            values[position[train_id]] = score
        if np.isnan(values).any():
            raise InfluenceStoreError(f"cannot upgrade the store: run {run_id}, test example {test_id}: scores "
                                      f"for some training examples are missing, so they cannot form a block; "
                                      f"delete the run or restore its scores")
        with np.errstate(over="ignore"):
            narrow = values.astype("<f4")
        encoding, blob = (("<f4", narrow.tobytes()) if np.array_equal(narrow.astype(np.float64), values)
                          else ("<f8", values.astype("<f8").tobytes()))
        connection.execute(sa.text("INSERT INTO score_blocks (run_id, test_example_id, encoding, scores) "
                                   "VALUES (:r, :t, :e, :b)"), {"r": run_id, "t": test_id, "e": encoding, "b": blob})
        extremes = []
        for side, keys in (("helpful", -values), ("harmful", values)):
            for rank, p in enumerate(_smallest(keys, EXTREMES_PER_SIDE), start=1):
                extremes.append({"r": run_id, "t": test_id, "s": side, "k": rank, "j": int(train[p]),
                                 "v": float(values[p])})
        connection.execute(sa.text("INSERT INTO score_extremes (run_id, test_example_id, side, rank, "
                                   "train_example_id, score) VALUES (:r, :t, :s, :k, :j, :v)"), extremes)
        row = [np.ones_like(values), values, values, values, (values < 0).astype(np.float64)]
        totals = row if totals is None else [totals[0] + row[0], totals[1] + row[1], np.minimum(totals[2], row[2]),
                                             np.maximum(totals[3], row[3]), totals[4] + row[4]]
    if totals is not None:
        connection.execute(sa.text(
            "INSERT INTO train_aggregates (run_id, train_example_id, n_test, sum_score, min_score, max_score, hurts) "
            "VALUES (:r, :j, :n, :s, :lo, :hi, :h)"),
            [{"r": run_id, "j": int(j), "n": int(n), "s": float(s), "lo": float(lo), "hi": float(hi), "h": int(h)}
             for j, n, s, lo, hi, h in zip(train, *totals)])


def downgrade() -> None:
    op.create_table('scores',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('test_example_id', sa.Integer(), nullable=False),
    sa.Column('train_example_id', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_scores_run_id_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['test_example_id'], ['examples.id'], name=op.f('fk_scores_test_example_id_examples')),
    sa.ForeignKeyConstraint(['train_example_id'], ['examples.id'], name=op.f('fk_scores_train_example_id_examples')),
    sa.PrimaryKeyConstraint('run_id', 'test_example_id', 'train_example_id', name=op.f('pk_scores')),
    sqlite_with_rowid=False
    )
    connection = op.get_bind()
    for run_id, test_id, encoding, blob in connection.execute(sa.text(
            "SELECT run_id, test_example_id, encoding, scores FROM score_blocks")).all():
        train_ids = [e for (e,) in connection.execute(sa.text(
            "SELECT example_id FROM run_examples WHERE run_id = :r AND split = 'train' ORDER BY position"),
            {"r": run_id})]
        values = np.frombuffer(blob, dtype=encoding).astype(np.float64).tolist()
        connection.execute(sa.text("INSERT INTO scores (run_id, test_example_id, train_example_id, score) "
                                   "VALUES (:r, :t, :j, :v)"),
                           [{"r": run_id, "t": test_id, "j": j, "v": v} for j, v in zip(train_ids, values)])
    op.drop_table('train_aggregates')
    op.drop_table('score_extremes')
    op.drop_table('score_blocks')
