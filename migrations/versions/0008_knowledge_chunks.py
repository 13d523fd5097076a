"""knowledge chunks

KnowledgeService's chunks of text for retrieval: unique by (source, external_id) where the
external id is set, searchable over title and content.

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.engine.search import create_search_objects, drop_search_objects

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

SEARCH = {"knowledge_chunks": (("title", "A"), ("content", "B"))}
WITH_EXTERNAL_ID = sa.text("external_id IS NOT NULL")


def upgrade() -> None:
    op.create_table('knowledge_chunks',
    sa.Column('source', sa.String(length=255), nullable=False),
    sa.Column('external_id', sa.String(length=512), nullable=True),
    sa.Column('title', sa.String(length=1024), nullable=True),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('chunk_metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_knowledge_chunks'))
    )
    with op.batch_alter_table('knowledge_chunks', schema=None) as batch_op:
        batch_op.create_index('ix_knowledge_chunks_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_knowledge_chunks_source', ['source'], unique=False)
        batch_op.create_index('uq_knowledge_chunks_source_external_id', ['source', 'external_id'], unique=True,
                              postgresql_where=WITH_EXTERNAL_ID, sqlite_where=WITH_EXTERNAL_ID)
    create_search_objects(op, SEARCH, stored=False)


def downgrade() -> None:
    drop_search_objects(op, SEARCH)
    with op.batch_alter_table('knowledge_chunks', schema=None) as batch_op:
        batch_op.drop_index('uq_knowledge_chunks_source_external_id', postgresql_where=WITH_EXTERNAL_ID, sqlite_where=WITH_EXTERNAL_ID)
        batch_op.drop_index('ix_knowledge_chunks_source')
        batch_op.drop_index('ix_knowledge_chunks_create_time_id')
    op.drop_table('knowledge_chunks')
