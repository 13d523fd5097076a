"""stored search vectors (PostgreSQL)

Each searchable table keeps its tsvector in a stored generated column, search_vector, with a
GIN index on that column, which the service searches on. A Search ranks its window with ts_rank of
the stored vectors: with the index on the expression, ranking rebuilt each hit's vector from
its text (300 hits of 42 KiB: 2.8 s; from the stored vectors, 3.5 ms; 300 tasks: 4.4 ms and about
0.3 ms). The column costs its vectors' room (about the size of the text again) and is computed
by the database on each INSERT and on each UPDATE of a column it is made from.

Expand, not contract: the GIN index on the expression stays (renamed
ix_<table>_expression_search), so that the previous version's servers, which search on the
expression, keep an index while a rollout runs; writes keep it up to date meanwhile (its
vector computed a second time). A later version drops it. An index missing (a restore of the
tables alone) is not renamed; the new one is built either way, and the downgrade builds the
expression's index where it is missing.

Adding a stored generated column rewrites the table under an ACCESS EXCLUSIVE lock: 40 s for
1,000,000 tasks on the benchmark machine; the upgrade is one transaction, so each table stays
locked until the last one is done. SQLite is unchanged (FTS5 keeps its own index).

Revision ID: 0020
Revises: 0019
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.engine.search import JsonText, pg_expression_index_ddl, pg_index_ddl, pg_vector_column_ddl
from db.migrate import SEARCH_VECTOR

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

# The index on the tsvector expression the migrations before this one made, kept under this name.
EXPRESSION_INDEX = "ix_{}_expression_search"

# Every searchable table at this revision, with the fields of its vector.
SEARCH = {
    "users": (("username", "A"), ("full_name", "A"), ("email", "B")),
    "roles": (("name", "A"), ("description", "B")),
    "projects": (("name", "A"), ("description", "B")),
    "tasks": (("title", "A"), ("description", "B")),
    "channels": (("name", "A"), ("description", "B")),
    "chat_messages": (("content", "A"),),
    "conversations": (("title", "A"),),
    "conversation_messages": (("content", "A"),),
    "audit_log_entries": (("summary", "A"),),
    "knowledge_chunks": (("title", "A"), ("content", "B")),
    "documents": (("title", "A"), (JsonText("content"), "B")),
    "files": (("name", "A"),),
    "emails": (("subject", "A"), ("body", "B")),
    "ai_interactions": (("prompt", "A"), ("response", "B")),
    "data_analyses": (("title", "A"),),
    "tool_generations": (("prompt", "A"), ("generated_code", "B")),
}


def _present(name: str) -> bool:
    return bool(op.get_bind().execute(sa.text("SELECT to_regclass(:name) IS NOT NULL"), {"name": name}).scalar())


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table_name, fields in SEARCH.items():
        # Expand: the previous version's servers, still serving while a rollout runs, search on
        # the expression; its index stays, under another name, until a later version drops it.
        op.execute(f"ALTER INDEX IF EXISTS ix_{table_name}_search RENAME TO {EXPRESSION_INDEX.format(table_name)}")
        op.execute(pg_vector_column_ddl(table_name, fields))
        op.execute(pg_index_ddl(table_name))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table_name, fields in SEARCH.items():
        op.execute(f"ALTER TABLE {table_name} DROP COLUMN IF EXISTS {SEARCH_VECTOR}")  # its index with it
        expression_index = EXPRESSION_INDEX.format(table_name)
        if _present(expression_index):
            op.execute(f"ALTER INDEX {expression_index} RENAME TO ix_{table_name}_search")
        else:
            op.execute(pg_expression_index_ddl(table_name, fields))
