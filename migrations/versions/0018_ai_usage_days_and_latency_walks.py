"""ai usage days and latency walks

GetAIUsageSummary over long ranges: the sums of whole days come from ai_usage_days (one row per
day, model, module, user and currency, kept by triggers on ai_interactions in the writers'
transactions, and filled here from the interactions already written), and each group's
percentiles from a walk of an index that holds its latencies in order
(db/domains/ai_usage.py AIUsageDay, PERCENTILE_WALKS).

PostgreSQL: those walks read the index alone only on pages VACUUM marked all-visible; by
default autovacuum visits an insert-only table after 20 % of growth, here after 2 %.

Revision ID: 0018
Revises: 0017
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.domains.ai_usage import usage_days_ddl, usage_days_drop

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None

WALKS = (
    ('ix_ai_interactions_latency_by_currency', ['cost_currency', 'latency_nanos', 'request_time']),
    ('ix_ai_interactions_latency_by_model', ['model', 'cost_currency', 'latency_nanos', 'request_time', 'module']),
    ('ix_ai_interactions_latency_by_module', ['module', 'cost_currency', 'latency_nanos', 'request_time']),
    ('ix_ai_interactions_latency_by_user', ['user_id', 'cost_currency', 'latency_nanos', 'request_time', 'model', 'module']),
)


def upgrade() -> None:
    op.create_table(
        'ai_usage_days',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('model', sa.String(length=255), nullable=False),
        sa.Column('module', sa.String(length=255), nullable=False),
        sa.Column('user_key', sa.String(length=36), nullable=False),
        sa.Column('currency', sa.String(length=3), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False)
          for name in ('call_count', 'timed', 'error_count', 'prompt_tokens', 'completion_tokens', 'cost_units', 'cost_nanos')),
        # PostgreSQL: the transaction that appended the row, which the server's folds go by.
        sa.Column('xact', sa.BigInteger(), nullable=True,
                  server_default=sa.text('(pg_current_xact_id()::text::bigint)') if op.get_bind().dialect.name == 'postgresql' else None),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ai_usage_days')),
    )
    op.create_index('ix_ai_usage_days_day_keys', 'ai_usage_days', ['day', 'model', 'module', 'user_key', 'currency'], unique=False)
    op.create_index('ix_ai_usage_days_xact', 'ai_usage_days', ['xact'], unique=False)
    for name, columns in WALKS:
        op.create_index(name, 'ai_interactions', columns, unique=False)
    dialect = op.get_bind().dialect.name
    for statement in usage_days_ddl(dialect):
        op.execute(statement)
    if dialect == 'postgresql':
        op.execute('ALTER TABLE ai_interactions SET (autovacuum_vacuum_insert_scale_factor = 0.02)')


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == 'postgresql':
        op.execute('ALTER TABLE ai_interactions RESET (autovacuum_vacuum_insert_scale_factor)')
    for statement in usage_days_drop(dialect):
        op.execute(statement)
    for name, _ in reversed(WALKS):
        op.drop_index(name, table_name='ai_interactions')
    op.drop_index('ix_ai_usage_days_xact', table_name='ai_usage_days')
    op.drop_index('ix_ai_usage_days_day_keys', table_name='ai_usage_days')
    op.drop_table('ai_usage_days')
