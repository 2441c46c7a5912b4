"""Relabel as a review outcome: the new label on proposals and their events; relabels counted in verifications.

Revision ID: 0006_proposal_relabel
Revises: 0005_block_claims
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = '0006_proposal_relabel'
down_revision = '0005_block_claims'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('proposals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('new_label_json', sa.Text(), nullable=True))
    with op.batch_alter_table('proposal_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('new_label_json', sa.Text(), nullable=True))
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('n_relabelled', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('n_relabelled')
    with op.batch_alter_table('proposal_events', schema=None) as batch_op:
        batch_op.drop_column('new_label_json')
    with op.batch_alter_table('proposals', schema=None) as batch_op:
        batch_op.drop_column('new_label_json')
