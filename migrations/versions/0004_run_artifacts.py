"""Run artifacts: blobs an approximator fitted for a run (EK-FAC factors), reused on resume.

Revision ID: 0004_run_artifacts
Revises: 0003_score_blocks
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0004_run_artifacts'
down_revision = '0003_score_blocks'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('run_artifacts',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('created_utc', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_artifacts_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'name', name=op.f('pk_run_artifacts'))
    )


def downgrade() -> None:
    op.drop_table('run_artifacts')
