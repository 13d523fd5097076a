"""users without an e-mail address; API key scopes

users.email may be NULL: EnsureUser makes a user from its external id alone, with no address,
and several users may have none (the unique constraint holds among those that have one; NULLs
are distinct on both databases). api_keys.scopes holds what a service's key may do beyond its
role (db/domains/identity.KEY_SCOPES).

On SQLite the users table is rebuilt (batch mode: its NOT NULL goes with the table's
definition); its full-text objects are made again after it, as the copy numbers its rows anew.
db/migrate.py runs migrations with SQLite's foreign keys off, so dropping the old table touches
no row that references it.

Revision ID: 0016
Revises: 0014
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.engine.search import create_search_objects, drop_search_objects

revision = '0016'
down_revision = '0014'
branch_labels = None
depends_on = None

USERS_SEARCH = {"users": (("username", "A"), ("full_name", "A"), ("email", "B"))}


def _users_nullable_email(nullable: bool) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        drop_search_objects(op, USERS_SEARCH)
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.alter_column('email', existing_type=sa.String(length=320), nullable=nullable)
    if sqlite:
        create_search_objects(op, USERS_SEARCH, stored=False)  # SQLite only: FTS5 either way


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            'scopes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), server_default='[]', nullable=False,
        ))
    _users_nullable_email(True)


def downgrade() -> None:
    # A user without an address gets one that reaches nobody (.invalid is reserved, RFC 2606),
    # unique by its username, so the NOT NULL can hold again.
    op.execute("UPDATE users SET email = username || '@no-email.invalid' WHERE email IS NULL")
    _users_nullable_email(False)
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('scopes')
