"""Create event_logs, the optional analytics/audit projection of published
events (messages stays the source of truth for chat).

Revision ID: 0003_event_logs
Revises: 0002_event_outbox
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0003_event_logs"
down_revision = "0002_event_outbox"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_event_logs_aggregate_id_created_at": ["aggregate_id", "created_at"],
    "ix_event_logs_project_id_created_at": ["project_id", "created_at"],
    "ix_event_logs_user_id_created_at": ["user_id", "created_at"],
}


def upgrade() -> None:
    op.create_table(
        "event_logs",
        # = event_outbox.id; no foreign key: the projection outlives outbox cleanup.
        sa.Column("event_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("user_id", UUID(as_uuid=True), nullable=True),
        sa.Column("project_id", UUID(as_uuid=True), nullable=True),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("payload", JSONB(), nullable=False),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("published_at", sa.TIMESTAMP(timezone=True), nullable=False),
    )
    for name, columns in INDEXES.items():
        op.create_index(name, "event_logs", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="event_logs")
    op.drop_table("event_logs")
