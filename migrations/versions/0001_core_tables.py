"""Core tables: datasets, examples, model versions, runs and every score.

Revision ID: 0001
Revises: 
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_utc', sa.String(length=40), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )

    op.create_table('examples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=500), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('label_json', sa.Text(), nullable=True),
    sa.Column('payload_json', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_examples_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_examples')),
    sa.UniqueConstraint('dataset_id', 'key', 'content_hash', name=op.f('uq_examples_dataset_id'))
    )

    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('checkpoint_path', sa.Text(), nullable=True),
    sa.Column('checkpoint_sha256', sa.String(length=64), nullable=True),
    sa.Column('weights_sha256', sa.String(length=64), nullable=True),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('created_utc', sa.String(length=40), nullable=False),
    sa.Column('notes', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_model_versions_dataset_id_datasets')),
    sa.ForeignKeyConstraint(['parent_id'], ['model_versions.id'], name=op.f('fk_model_versions_parent_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('name', name=op.f('uq_model_versions_name'))
    )

    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('train_dataset_id', sa.Integer(), nullable=False),
    sa.Column('test_dataset_id', sa.Integer(), nullable=False),
    sa.Column('task_spec', sa.Text(), nullable=False),
    sa.Column('task_options_json', sa.Text(), nullable=False),
    sa.Column('approximator', sa.String(length=100), nullable=False),
    sa.Column('options_json', sa.Text(), nullable=False),
    sa.Column('freeze', sa.String(length=100), nullable=False),
    sa.Column('freeze_options_json', sa.Text(), nullable=False),
    sa.Column('tracked_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('num_params', sa.Integer(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('effective_damping', sa.Float(), nullable=False),
    sa.Column('sign_convention', sa.Text(), nullable=False),
    sa.Column('versions_json', sa.Text(), nullable=False),
    sa.Column('device', sa.String(length=40), nullable=False),
    sa.Column('settings_json', sa.Text(), nullable=False),
    sa.Column('settings_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('n_test', sa.Integer(), nullable=False),
    sa.Column('chunks_total', sa.Integer(), nullable=False),
    sa.Column('chunks_done', sa.Integer(), nullable=False),
    sa.Column('created_utc', sa.String(length=40), nullable=False),
    sa.Column('started_utc', sa.String(length=40), nullable=True),
    sa.Column('finished_utc', sa.String(length=40), nullable=True),
    sa.Column('seconds_total', sa.Float(), nullable=False),
    sa.Column('seconds_writing', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('diagnostics_json', sa.Text(), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed')", name=op.f('ck_runs_status')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_runs_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['test_dataset_id'], ['datasets.id'], name=op.f('fk_runs_test_dataset_id_datasets')),
    sa.ForeignKeyConstraint(['train_dataset_id'], ['datasets.id'], name=op.f('fk_runs_train_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_settings_fingerprint'), ['settings_fingerprint'], unique=False)

    op.create_table('run_chunks',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('chunk_index', sa.Integer(), nullable=False),
    sa.Column('finished_utc', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_chunks_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'chunk_index', name=op.f('pk_run_chunks'))
    )

    op.create_table('run_examples',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('split', sa.String(length=5), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('example_id', sa.Integer(), nullable=False),
    sa.Column('loss', sa.Float(), nullable=False),
    sa.Column('self_influence', sa.Float(), nullable=True),
    sa.CheckConstraint("split IN ('train', 'test')", name=op.f('ck_run_examples_split')),
    sa.ForeignKeyConstraint(['example_id'], ['examples.id'], name=op.f('fk_run_examples_example_id_examples')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_examples_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'split', 'position', name=op.f('pk_run_examples'))
    )
    with op.batch_alter_table('run_examples', schema=None) as batch_op:
        batch_op.create_index('ix_run_examples_example', ['example_id'], unique=False)

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


def downgrade() -> None:
    op.drop_table('scores')
    op.drop_table('run_examples')
    op.drop_table('run_chunks')
    op.drop_table('runs')
    op.drop_table('model_versions')
    op.drop_table('examples')
    op.drop_table('datasets')
