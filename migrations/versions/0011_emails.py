"""emails

MailService's emails (soft-deleted, searchable over subject and body): recipients by address and
by user id as JSON arrays, a thread id shared by the emails of one conversation, the status
draft / sent / received.

Revision ID: 0011
Revises: 0010
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.engine.search import create_search_objects, drop_search_objects

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

SEARCH = {"emails": (("subject", "A"), ("body", "B"))}


def _json_list(name: str) -> sa.Column:
    return sa.Column(name, sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False)


def upgrade() -> None:
    op.create_table('emails',
    sa.Column('sender_id', sa.Uuid(), nullable=True),
    *(_json_list(name) for name in ('to', 'cc', 'bcc', 'to_user_ids', 'cc_user_ids', 'bcc_user_ids')),
    sa.Column('subject', sa.String(length=998), nullable=True),
    sa.Column('body', sa.Text(), nullable=True),
    sa.Column('thread_id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    _json_list('attachments'),
    sa.Column('sent_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('delete_time', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('draft', 'sent', 'received')", name=op.f('ck_emails_status_valid')),
    sa.ForeignKeyConstraint(['sender_id'], ['users.id'], name=op.f('fk_emails_sender_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_emails'))
    )
    with op.batch_alter_table('emails', schema=None) as batch_op:
        batch_op.create_index('ix_emails_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_emails_sender_id', ['sender_id'], unique=False)
        batch_op.create_index('ix_emails_thread_id', ['thread_id'], unique=False)
    create_search_objects(op, SEARCH, stored=False)


def downgrade() -> None:
    drop_search_objects(op, SEARCH)
    with op.batch_alter_table('emails', schema=None) as batch_op:
        batch_op.drop_index('ix_emails_thread_id')
        batch_op.drop_index('ix_emails_sender_id')
        batch_op.drop_index('ix_emails_create_time_id')

    op.drop_table('emails')
