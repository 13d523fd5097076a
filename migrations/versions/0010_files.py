"""files

FileService's files: the metadata of stored files (their bytes are in the blob store, by
SHA-256), soft-deleted, searchable by name; a file's owner cleared if the user goes for good.

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.engine.search import create_search_objects, drop_search_objects

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

SEARCH = {"files": (("name", "A"),)}


def upgrade() -> None:
    op.create_table('files',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('mime_type', sa.String(length=255), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('is_public', sa.Boolean(), nullable=False),
    sa.Column('download_count', sa.BigInteger(), nullable=False),
    sa.Column('owner_id', sa.Uuid(), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('delete_time', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_files_owner_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_files'))
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index('ix_files_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_files_owner_id', ['owner_id'], unique=False)
        batch_op.create_index('ix_files_sha256', ['sha256'], unique=False)
    create_search_objects(op, SEARCH, stored=False)


def downgrade() -> None:
    drop_search_objects(op, SEARCH)
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index('ix_files_sha256')
        batch_op.drop_index('ix_files_owner_id')
        batch_op.drop_index('ix_files_create_time_id')
    op.drop_table('files')
