"""ai interactions

AIService's AI interactions (records: never updated, not soft-deleted; searchable over prompt
and response), with the indexes GetAIUsageSummary needs: request_time (a range over everyone's)
and (user_id, request_time) (a user's own). Cost as integers (units, nanos, currency) and
latency as integer nanoseconds: exact sums and percentiles on both databases.

Revision ID: 0012
Revises: 0011
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.engine.search import create_search_objects, drop_search_objects

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

SEARCH = {"ai_interactions": (("prompt", "A"), ("response", "B"))}


def upgrade() -> None:
    op.create_table('ai_interactions',
    sa.Column('user_id', sa.Uuid(), nullable=True),
    sa.Column('module', sa.String(length=255), nullable=False),
    sa.Column('model', sa.String(length=255), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('response', sa.Text(), nullable=True),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('total_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_units', sa.BigInteger(), nullable=True),
    sa.Column('cost_nanos', sa.Integer(), nullable=True),
    sa.Column('cost_currency', sa.String(length=3), nullable=True),
    sa.Column('latency_nanos', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('request_metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('request_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.CheckConstraint("status IN ('succeeded', 'failed', 'timed_out')", name=op.f('ck_ai_interactions_status_valid')),
    sa.CheckConstraint('prompt_tokens >= 0 AND completion_tokens >= 0 AND total_tokens = prompt_tokens + completion_tokens', name=op.f('ck_ai_interactions_tokens_valid')),
    sa.CheckConstraint('cost_units IS NULL OR (cost_units >= 0 AND cost_nanos >= 0 AND cost_nanos < 1000000000 AND cost_currency IS NOT NULL)', name=op.f('ck_ai_interactions_cost_valid')),
    sa.CheckConstraint('latency_nanos IS NULL OR latency_nanos >= 0', name=op.f('ck_ai_interactions_latency_valid')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_ai_interactions_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ai_interactions'))
    )
    with op.batch_alter_table('ai_interactions', schema=None) as batch_op:
        batch_op.create_index('ix_ai_interactions_create_time_id', ['create_time', 'id'], unique=False)
        batch_op.create_index('ix_ai_interactions_request_time', ['request_time'], unique=False)
        batch_op.create_index('ix_ai_interactions_user_id_request_time', ['user_id', 'request_time'], unique=False)
    create_search_objects(op, SEARCH, stored=False)


def downgrade() -> None:
    drop_search_objects(op, SEARCH)
    with op.batch_alter_table('ai_interactions', schema=None) as batch_op:
        batch_op.drop_index('ix_ai_interactions_user_id_request_time')
        batch_op.drop_index('ix_ai_interactions_request_time')
        batch_op.drop_index('ix_ai_interactions_create_time_id')

    op.drop_table('ai_interactions')
