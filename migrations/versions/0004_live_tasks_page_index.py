"""live tasks page index

A partial index for the most common task page: the live tasks of one project in one status, in
creation order (ListTasks with `project_id = ... AND status = ...`, keyset on create_time, id).

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

LIVE = sa.text("delete_time IS NULL")


def upgrade() -> None:
    op.create_index(
        'ix_tasks_live_project_status_create_time',
        'tasks',
        ['project_id', 'status', 'create_time', 'id'],
        unique=False,
        postgresql_where=LIVE,
        sqlite_where=LIVE,
    )


def downgrade() -> None:
    op.drop_index('ix_tasks_live_project_status_create_time', table_name='tasks')
