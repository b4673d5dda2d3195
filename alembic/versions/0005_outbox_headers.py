"""Message headers of the event's own: event_outbox.headers.

- headers jsonb NULL: a JSON object whose values are strings (the check
  constraint enforces this shape only; the rules on names and values are
  the tailer's and the producer crate's, docs/contract.md section 3). NULL
  or {} = none.

On a big outbox this neither rewrites the table nor holds a long lock:
- ADD COLUMN with no default is a catalog change (no rewrite), and the
  constraint is added NOT VALID (no scan): both take the table's ACCESS
  EXCLUSIVE lock for a moment only. lock_timeout bounds the wait for it, so
  a long transaction on the table makes the migration fail (run it again)
  instead of queueing every writer behind it.
- VALIDATE CONSTRAINT then scans the table in its own transaction under
  SHARE UPDATE EXCLUSIVE, which lets inserts, updates and the tailer go on.

Revision ID: 0005_outbox_headers
Revises: 0004_outbox_retention
"""
from alembic import op

revision = "0005_outbox_headers"
down_revision = "0004_outbox_retention"
branch_labels = None
depends_on = None

CHECK = "ck_event_outbox_headers"
SHAPE = (
    "headers IS NULL OR (jsonb_typeof(headers) = 'object' "
    "AND NOT jsonb_path_exists(headers, '$.* ? (@.type() != \"string\")'))"
)


def upgrade() -> None:
    # Each step may already be done: a run interrupted after the first
    # commit (before VALIDATE finished) is run again as it is.
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("ALTER TABLE event_outbox ADD COLUMN IF NOT EXISTS headers jsonb")
    op.execute(
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_constraint
                           WHERE conname = '{CHECK}' AND conrelid = 'event_outbox'::regclass) THEN
                ALTER TABLE event_outbox ADD CONSTRAINT {CHECK} CHECK ({SHAPE}) NOT VALID;
            END IF;
        END $$
        """
    )
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE event_outbox VALIDATE CONSTRAINT {CHECK}")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(f"ALTER TABLE event_outbox DROP CONSTRAINT IF EXISTS {CHECK}")
    op.execute("ALTER TABLE event_outbox DROP COLUMN IF EXISTS headers")
