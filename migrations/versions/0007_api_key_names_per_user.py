"""api key names per user

An API key's name is unique among its user's keys (and among the keys of no user) instead of
across all keys: ALREADY_EXISTS told a user the names of keys it may not see.

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

WITH_USER = sa.text("user_id IS NOT NULL")
WITHOUT_USER = sa.text("user_id IS NULL")


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_constraint('uq_api_keys_name', type_='unique')
        batch_op.create_index('uq_api_keys_user_id_name', ['user_id', 'name'], unique=True,
                              postgresql_where=WITH_USER, sqlite_where=WITH_USER)
        batch_op.create_index('uq_api_keys_name_without_user', ['name'], unique=True,
                              postgresql_where=WITHOUT_USER, sqlite_where=WITHOUT_USER)


def downgrade() -> None:
    # Fails while two users' keys share a name: rename one first.
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index('uq_api_keys_name_without_user')
        batch_op.drop_index('uq_api_keys_user_id_name')
        batch_op.create_unique_constraint('uq_api_keys_name', ['name'])
