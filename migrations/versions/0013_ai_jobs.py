"""ai jobs

AIService's data analyses, their files and tool generations: analyses and generations owned by
a user (cleared if the user is deleted for good), with a status pending / running / completed /
failed and its times, searchable (an analysis by title, a generation by prompt and generated
code); an analysis's files link it to Files and go with it (ON DELETE CASCADE).

Revision ID: 0013
Revises: 0012
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.engine.search import create_search_objects, drop_search_objects

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

SEARCH = {
    "data_analyses": (("title", "A"),),
    "tool_generations": (("prompt", "A"), ("generated_code", "B")),
}
STATUS_CHECK = "status IN ('pending', 'running', 'completed', 'failed')"


def _json(name: str) -> sa.Column:
    return sa.Column(name, sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True)


def _common() -> list[sa.Column]:
    return [
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
        sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revision', sa.Integer(), nullable=False),
    ]


def _job(name: str) -> list[sa.Column]:
    return [
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('started_time', sa.DateTime(timezone=True), nullable=True),
        sa.Column('completed_time', sa.DateTime(timezone=True), nullable=True),
        *_common(),
    ]


def upgrade() -> None:
    op.create_table('data_analyses',
    sa.Column('user_id', sa.Uuid(), nullable=True),
    sa.Column('title', sa.String(length=500), nullable=False),
    sa.Column('analysis_type', sa.String(length=100), nullable=False),
    _json('parameters'),
    _json('result'),
    *_job('data_analyses'),
    sa.CheckConstraint(STATUS_CHECK, name=op.f('ck_data_analyses_status_valid')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_data_analyses_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_data_analyses'))
    )
    with op.batch_alter_table('data_analyses', schema=None) as batch_op:
        batch_op.create_index('ix_data_analyses_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_data_analyses_user_id', ['user_id'], unique=False)

    op.create_table('analysis_files',
    sa.Column('analysis_id', sa.Uuid(), nullable=False),
    sa.Column('file_id', sa.Uuid(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    *_common(),
    sa.CheckConstraint("role IN ('input', 'output')", name=op.f('ck_analysis_files_role_valid')),
    sa.ForeignKeyConstraint(['analysis_id'], ['data_analyses.id'], name=op.f('fk_analysis_files_analysis_id_data_analyses'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['file_id'], ['files.id'], name=op.f('fk_analysis_files_file_id_files'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_analysis_files'))
    )
    with op.batch_alter_table('analysis_files', schema=None) as batch_op:
        batch_op.create_index('ix_analysis_files_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_analysis_files_analysis_id', ['analysis_id'], unique=False)
        batch_op.create_index('ix_analysis_files_file_id', ['file_id'], unique=False)

    op.create_table('tool_generations',
    sa.Column('user_id', sa.Uuid(), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('tool_type', sa.String(length=100), nullable=False),
    _json('specification'),
    sa.Column('generated_code', sa.Text(), nullable=True),
    sa.Column('output', sa.Text(), nullable=True),
    *_job('tool_generations'),
    sa.CheckConstraint(STATUS_CHECK, name=op.f('ck_tool_generations_status_valid')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_tool_generations_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tool_generations'))
    )
    with op.batch_alter_table('tool_generations', schema=None) as batch_op:
        batch_op.create_index('ix_tool_generations_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_tool_generations_user_id', ['user_id'], unique=False)
    create_search_objects(op, SEARCH, stored=False)


def downgrade() -> None:
    drop_search_objects(op, SEARCH)
    with op.batch_alter_table('tool_generations', schema=None) as batch_op:
        batch_op.drop_index('ix_tool_generations_user_id')
        batch_op.drop_index('ix_tool_generations_create_time_id')
    op.drop_table('tool_generations')
    with op.batch_alter_table('analysis_files', schema=None) as batch_op:
        batch_op.drop_index('ix_analysis_files_file_id')
        batch_op.drop_index('ix_analysis_files_analysis_id')
        batch_op.drop_index('ix_analysis_files_create_time_id')
    op.drop_table('analysis_files')
    with op.batch_alter_table('data_analyses', schema=None) as batch_op:
        batch_op.drop_index('ix_data_analyses_user_id')
        batch_op.drop_index('ix_data_analyses_create_time_id')
    op.drop_table('data_analyses')
