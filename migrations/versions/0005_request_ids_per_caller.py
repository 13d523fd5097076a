"""request ids per caller

A request id is remembered per caller: request_records gains `principal` (the API key, the
JWT's user, or the service itself, as `<actor type>:<actor id>`) and its unique key becomes
(resource_type, principal, request_id), so another caller's retry of the same id is a new
request. Existing records take the actor of the audit entry their create wrote.

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

import uuid

from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

RECORDS = sa.table(
    'request_records',
    sa.column('id', sa.Uuid()),
    sa.column('resource_type', sa.String()),
    sa.column('resource_id', sa.Uuid()),
    sa.column('request_id', sa.String()),
    sa.column('principal', sa.String()),
)
AUDIT = sa.table(
    'audit_log_entries',
    sa.column('resource_type', sa.String()),
    sa.column('actor_type', sa.String()),
    sa.column('actor_id', sa.Uuid()),
    sa.column('action', sa.String()),
    sa.column('resource_id', sa.Uuid()),
    sa.column('request_id', sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table('request_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('principal', sa.String(length=64), server_default='', nullable=False))
        batch_op.drop_constraint('uq_request_records_resource_type_request_id', type_='unique')
        batch_op.create_unique_constraint(
            batch_op.f('uq_request_records_resource_type_principal_request_id'), ['resource_type', 'principal', 'request_id']
        )
    conn = op.get_bind()
    # The create's entry of the record's resource (an entry's request_id is the call's
    # x-request-id, not the body's request_id the record keeps).
    creators = sa.select(RECORDS.c.id, AUDIT.c.actor_type, AUDIT.c.actor_id).join(
        AUDIT,
        sa.and_(
            AUDIT.c.resource_type == RECORDS.c.resource_type,
            AUDIT.c.resource_id == RECORDS.c.resource_id,
            AUDIT.c.action == 'create',
        ),
    )
    found: dict[uuid.UUID, str] = {}
    for record_id, actor_type, actor_id in conn.execute(creators):
        found[record_id] = f"{actor_type}:{actor_id or ''}"
    if found:
        conn.execute(
            RECORDS.update().where(RECORDS.c.id == sa.bindparam('record_id')).values(principal=sa.bindparam('who')),
            [{'record_id': record_id, 'who': who} for record_id, who in found.items()],
        )


def downgrade() -> None:
    conn = op.get_bind()
    # Two callers' records of one request id cannot both stay under the old key: keep the first made.
    conn.execute(sa.text(
        "DELETE FROM request_records WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER "
        "(PARTITION BY resource_type, request_id ORDER BY create_time, id) AS n FROM request_records) AS ranked WHERE n > 1)"
    ))
    with op.batch_alter_table('request_records', schema=None) as batch_op:
        batch_op.drop_constraint('uq_request_records_resource_type_principal_request_id', type_='unique')
        batch_op.create_unique_constraint('uq_request_records_resource_type_request_id', ['resource_type', 'request_id'])
        batch_op.drop_column('principal')
