"""audit log

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa

from db.engine.search import create_search_objects, drop_search_objects
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

SEARCH = {"audit_log_entries": (("summary", "A"),)}


def upgrade() -> None:
    op.create_table('audit_log_entries',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('actor_type', sa.String(length=16), nullable=False),
    sa.Column('actor_id', sa.Uuid(), nullable=True),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.Uuid(), nullable=False),
    sa.Column('changes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=True),
    sa.Column('method', sa.String(length=255), nullable=True),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("action IN ('create', 'update', 'delete', 'undelete')", name=op.f('ck_audit_log_entries_action_valid')),
    sa.CheckConstraint("actor_type IN ('user', 'api_key', 'system')", name=op.f('ck_audit_log_entries_actor_type_valid')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log_entries'))
    )
    with op.batch_alter_table('audit_log_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_entries_action'), ['action'], unique=False)
        batch_op.create_index('ix_audit_log_entries_actor_id_create_time', ['actor_id', 'create_time'], unique=False)
        batch_op.create_index('ix_audit_log_entries_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_entries_request_id'), ['request_id'], unique=False)
        batch_op.create_index('ix_audit_log_entries_resource_type_resource_id', ['resource_type', 'resource_id'], unique=False)
    create_search_objects(op, SEARCH, stored=False)


def downgrade() -> None:
    drop_search_objects(op, SEARCH)
    with op.batch_alter_table('audit_log_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_log_entries_resource_type_resource_id')
        batch_op.drop_index(batch_op.f('ix_audit_log_entries_request_id'))
        batch_op.drop_index('ix_audit_log_entries_create_time_id')
        batch_op.drop_index('ix_audit_log_entries_actor_id_create_time')
        batch_op.drop_index(batch_op.f('ix_audit_log_entries_action'))

    op.drop_table('audit_log_entries')
