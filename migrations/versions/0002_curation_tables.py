"""Curation tables: removal proposals, their review events, verifications.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('proposals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('example_id', sa.Integer(), nullable=False),
    sa.Column('rule', sa.String(length=100), nullable=False),
    sa.Column('rule_options_json', sa.Text(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('evidence_json', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('reviewer', sa.String(length=200), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('applied_version_id', sa.Integer(), nullable=True),
    sa.Column('created_utc', sa.String(length=40), nullable=False),
    sa.Column('updated_utc', sa.String(length=40), nullable=False),
    sa.CheckConstraint("status IN ('proposed', 'accepted', 'rejected', 'applied')", name=op.f('ck_proposals_status')),
    sa.ForeignKeyConstraint(['applied_version_id'], ['model_versions.id'], name=op.f('fk_proposals_applied_version_id_model_versions')),
    sa.ForeignKeyConstraint(['example_id'], ['examples.id'], name=op.f('fk_proposals_example_id_examples')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_proposals_run_id_runs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_proposals'))
    )
    with op.batch_alter_table('proposals', schema=None) as batch_op:
        batch_op.create_index('ix_proposals_example', ['example_id'], unique=False)

    op.create_table('verifications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('proposal_ids_json', sa.Text(), nullable=False),
    sa.Column('n_removed', sa.Integer(), nullable=False),
    sa.Column('predicted_loss_change', sa.Float(), nullable=False),
    sa.Column('actual_loss_change', sa.Float(), nullable=False),
    sa.Column('loss_before', sa.Float(), nullable=False),
    sa.Column('loss_after', sa.Float(), nullable=False),
    sa.Column('accuracy_before', sa.Float(), nullable=True),
    sa.Column('accuracy_after', sa.Float(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('created_utc', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_verifications_run_id_runs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_verifications'))
    )

    op.create_table('proposal_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('proposal_id', sa.Integer(), nullable=False),
    sa.Column('from_status', sa.String(length=20), nullable=True),
    sa.Column('to_status', sa.String(length=20), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('created_utc', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['proposal_id'], ['proposals.id'], name=op.f('fk_proposal_events_proposal_id_proposals')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_proposal_events'))
    )
    with op.batch_alter_table('proposal_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_proposal_events_proposal_id'), ['proposal_id'], unique=False)


def downgrade() -> None:
    op.drop_table('proposal_events')
    op.drop_table('verifications')
    op.drop_table('proposals')
