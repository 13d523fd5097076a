"""ai usage latency bucket statistics

GetAIUsageSummary sums each (group, latency bucket) in one hash aggregate. PostgreSQL cannot
estimate how many buckets an expression makes (it takes every row for its own), and then plans
a sort of every row instead of a parallel hash aggregate; extended statistics on each bucket
expression the summary uses (db/domains/ai_usage.py BUCKET_BITS) give it their number.
ANALYZE (or autovacuum's) fills them. SQLite has no such statistics and needs none.

Revision ID: 0014
Revises: 0013
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.domains.ai_usage import BUCKET_BITS, latency_bucket

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def _expression(bits: int) -> str:
    column = sa.column("latency_nanos", sa.BigInteger)
    return str(latency_bucket(column, bits).compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for bits in sorted(set(BUCKET_BITS.values())):
        op.execute(f"CREATE STATISTICS ai_interactions_latency_bucket_{bits} ON ({_expression(bits)}) FROM ai_interactions")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for bits in sorted(set(BUCKET_BITS.values())):
        op.execute(f"DROP STATISTICS IF EXISTS ai_interactions_latency_bucket_{bits}")
