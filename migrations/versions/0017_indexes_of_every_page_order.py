"""indexes of every page order

A List page of tasks, projects and users in any orderable field's order is read through an
index: EXPLAIN of the service's page statements over tens of thousands of rows showed a Seq Scan
and a sort of the whole table for these orders (and for tasks cut by completed_time or
update_time), tests/test_index_backed.py. Each index ends with id, the order's tiebreaker.

Revision ID: 0017
Revises: 0016
"""
from __future__ import annotations

from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

INDEXES = (
    ('ix_tasks_update_time_id', 'tasks', ['update_time', 'id']),
    ('ix_tasks_title_id', 'tasks', ['title', 'id']),
    ('ix_tasks_completed_time_id', 'tasks', ['completed_time', 'id']),
    ('ix_projects_update_time_id', 'projects', ['update_time', 'id']),
    ('ix_projects_name_id', 'projects', ['name', 'id']),
    ('ix_projects_start_date_id', 'projects', ['start_date', 'id']),
    ('ix_projects_end_date_id', 'projects', ['end_date', 'id']),
    ('ix_users_update_time_id', 'users', ['update_time', 'id']),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns, unique=False)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
