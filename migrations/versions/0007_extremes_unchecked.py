"""Ranked extremes without foreign keys; room for in-place aggregate updates on PostgreSQL.

``score_extremes`` rows are derived from a chunk's scores, whose ids the writer has already checked
(``ScoreStore._check_chunk_ids``), and nothing deletes runs or examples. PostgreSQL checks a foreign key
with one trigger query per row: three per ranked row cost five times the ``COPY`` itself (measured by
``benchmarks/bench_scale.py``). ``score_blocks`` keeps its foreign keys (one row per test example).

On PostgreSQL, ``train_aggregates`` pages are left half empty (``fillfactor = 50``): every chunk updates
every row of its run, and free room on the page lets PostgreSQL update a row in place (a HOT update)
instead of writing a new index entry.

Revision ID: 0007_extremes_unchecked
Revises: 0006_proposal_relabel
Create Date: 2026-12-02
"""
from alembic import op

revision = '0007_extremes_unchecked'
down_revision = '0006_proposal_relabel'
branch_labels = None
depends_on = None

FOREIGN_KEYS = [  # (name, column, referred table)
    ('fk_score_extremes_run_id_runs', 'run_id', 'runs'),
    ('fk_score_extremes_test_example_id_examples', 'test_example_id', 'examples'),
    ('fk_score_extremes_train_example_id_examples', 'train_example_id', 'examples'),
]


def upgrade() -> None:
    with op.batch_alter_table('score_extremes', schema=None) as batch_op:
        for name, _, _ in FOREIGN_KEYS:
            batch_op.drop_constraint(name, type_='foreignkey')
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE train_aggregates SET (fillfactor = 50)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE train_aggregates RESET (fillfactor)')
    with op.batch_alter_table('score_extremes', schema=None) as batch_op:
        for name, column, table in FOREIGN_KEYS:
            batch_op.create_foreign_key(name, table, [column], ['id'],
                                        ondelete='CASCADE' if table == 'runs' else None)
