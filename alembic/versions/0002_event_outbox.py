"""Create event_outbox (the transactional outbox), its indexes and the
insert-only publication the tailer's replication slot reads.

Revision ID: 0002_event_outbox
Revises: 0001_messages
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0002_event_outbox"
down_revision = "0001_messages"
branch_labels = None
depends_on = None

# Index names are part of the contract: EXPLAIN output and dashboards name them.
INDEXES = {
    "ix_event_outbox_status_next_retry_at_created_at": ["status", "next_retry_at", "created_at"],
    "ix_event_outbox_aggregate_id_created_at": ["aggregate_id", "created_at"],
    "ix_event_outbox_project_id_created_at": ["project_id", "created_at"],
    "ix_event_outbox_user_id_created_at": ["user_id", "created_at"],
}


def upgrade() -> None:
    now = sa.text("now()")
    op.create_table(
        "event_outbox",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("user_id", UUID(as_uuid=True), nullable=True),
        sa.Column("project_id", UUID(as_uuid=True), nullable=True),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("payload", JSONB(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default=sa.text("'pending'")),
        sa.Column("retry_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_retry_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=now),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=now),
        sa.Column("published_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'published', 'failed')", name="ck_event_outbox_status"
        ),
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "event_outbox", columns)
    # Inserts only: the tailer publishes new events; its own status updates
    # (and any other update or delete) must never reach the slot.
    op.execute("CREATE PUBLICATION event_outbox_pub FOR TABLE event_outbox WITH (publish = 'insert')")


def downgrade() -> None:
    op.execute("DROP PUBLICATION IF EXISTS event_outbox_pub")
    for name in INDEXES:
        op.drop_index(name, table_name="event_outbox")
    op.drop_table("event_outbox")
