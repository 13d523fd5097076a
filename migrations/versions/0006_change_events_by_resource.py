"""change events by resource

An index of change_events by resource_id: a deleted resource's earlier events are redacted
(db/events.redact), so that a resume from before the delete brings back none of its content.

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_change_events_resource_id', 'change_events', ['resource_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_change_events_resource_id', table_name='change_events')
