"""Block claims: leases on a run's blocks, so several processes share one run.

Revision ID: 0005_block_claims
Revises: 0004_run_artifacts
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0005_block_claims'
down_revision = '0004_run_artifacts'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('run_claims',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('block', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires', sa.Float(), nullable=False),
    sa.Column('claims', sa.Integer(), nullable=False),
    sa.Column('finished_utc', sa.String(length=40), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_claims_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'block', name=op.f('pk_run_claims'))
    )


def downgrade() -> None:
    op.drop_table('run_claims')
