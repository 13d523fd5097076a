"""documents

KnowledgeService's documents (soft-deleted, searchable over the title and the string values of
the content), the states they had (one per document and version number) and their shares (one
per document and user); versions and shares go with their document, and shares with their user.

Revision ID: 0009
Revises: 0008
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from sqlalchemy.dialects import postgresql

from db.engine.search import JsonText, create_search_objects, drop_search_objects

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

SEARCH = {"documents": (("title", "A"), (JsonText("content"), "B"))}


def upgrade() -> None:
    op.create_table('documents',
    sa.Column('title', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('content', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('owner_id', sa.Uuid(), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('last_editor_id', sa.Uuid(), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('delete_time', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('word', 'excel', 'powerpoint', 'other')", name=op.f('ck_documents_kind_valid')),
    sa.ForeignKeyConstraint(['last_editor_id'], ['users.id'], name=op.f('fk_documents_last_editor_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_documents_owner_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_documents'))
    )
    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.create_index('ix_documents_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_documents_owner_id', ['owner_id'], unique=False)

    op.create_table('document_shares',
    sa.Column('document_id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('level', sa.String(length=16), nullable=False),
    sa.Column('shared_by_id', sa.Uuid(), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.CheckConstraint("level IN ('view', 'comment', 'edit')", name=op.f('ck_document_shares_level_valid')),
    sa.ForeignKeyConstraint(['document_id'], ['documents.id'], name=op.f('fk_document_shares_document_id_documents'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['shared_by_id'], ['users.id'], name=op.f('fk_document_shares_shared_by_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_document_shares_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_document_shares'))
    )
    with op.batch_alter_table('document_shares', schema=None) as batch_op:
        batch_op.create_index('ix_document_shares_user_id', ['user_id'], unique=False)
        batch_op.create_index('uq_document_shares_document_id_user_id', ['document_id', 'user_id'], unique=True)

    op.create_table('document_versions',
    sa.Column('document_id', sa.Uuid(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('title', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('content', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('author_id', sa.Uuid(), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.CheckConstraint("kind IN ('word', 'excel', 'powerpoint', 'other')", name=op.f('ck_document_versions_kind_valid')),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], name=op.f('fk_document_versions_author_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['document_id'], ['documents.id'], name=op.f('fk_document_versions_document_id_documents'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_document_versions'))
    )
    with op.batch_alter_table('document_versions', schema=None) as batch_op:
        batch_op.create_index('uq_document_versions_document_id_version', ['document_id', 'version'], unique=True)
    create_search_objects(op, SEARCH, stored=False)


def downgrade() -> None:
    drop_search_objects(op, SEARCH)
    with op.batch_alter_table('document_versions', schema=None) as batch_op:
        batch_op.drop_index('uq_document_versions_document_id_version')

    op.drop_table('document_versions')
    with op.batch_alter_table('document_shares', schema=None) as batch_op:
        batch_op.drop_index('uq_document_shares_document_id_user_id')
        batch_op.drop_index('ix_document_shares_user_id')

    op.drop_table('document_shares')
    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.drop_index('ix_documents_owner_id')
        batch_op.drop_index('ix_documents_create_time_id')

    op.drop_table('documents')
