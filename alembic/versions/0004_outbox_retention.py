"""Retention: delete old published rows in small batches, through an index.

- ix_event_outbox_published_at: published rows by published_at. Partial
  (status = 'published'): it holds only what retention may delete and costs
  nothing on the insert path (a new row is pending). Created CONCURRENTLY,
  outside a transaction, so upgrading a live outbox does not block writes.
- The publication publishes via the partition root, so a partitioned
  event_outbox (by created_at, to drop old partitions) streams like a plain
  one; for a plain table the option changes nothing.
- outbox_prune(older_than, batch): deletes at most `batch` published rows
  published longer ago than `older_than`, oldest first, skipping rows another
  session holds; returns how many. SECURITY DEFINER, so the tailer's role
  needs EXECUTE on it and no DELETE on the table: the database itself keeps
  retention from ever touching a pending or failed row.

Revision ID: 0004_outbox_retention
Revises: 0003_event_logs
"""
from alembic import op

revision = "0004_outbox_retention"
down_revision = "0003_event_logs"
branch_labels = None
depends_on = None

INDEX = "ix_event_outbox_published_at"

PRUNE = """
CREATE FUNCTION outbox_prune(older_than interval, batch integer) RETURNS integer
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, public
    AS $$
    WITH gone AS (
        DELETE FROM public.event_outbox WHERE id IN (
            SELECT id FROM public.event_outbox
            WHERE status = 'published' AND published_at < now() - older_than
            ORDER BY published_at LIMIT batch
            FOR UPDATE SKIP LOCKED)
        RETURNING 1)
    SELECT count(*)::integer FROM gone
$$
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} "
            "ON event_outbox (published_at) WHERE status = 'published'"
        )
    op.execute(PRUNE)
    op.execute("REVOKE ALL ON FUNCTION outbox_prune(interval, integer) FROM PUBLIC")
    op.execute("ALTER PUBLICATION event_outbox_pub SET (publish_via_partition_root = true)")


def downgrade() -> None:
    op.execute("ALTER PUBLICATION event_outbox_pub SET (publish_via_partition_root = false)")
    op.execute("DROP FUNCTION IF EXISTS outbox_prune(interval, integer)")
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
