"""Republish's selection: published rows in (created_at, id) order.

- ix_event_outbox_created_at_id (created_at, id) WHERE status = 'published':
  `outbox-tailer republish` reads its selection in (created_at, id) pages (a
  keyset); this index hands over each page in order, from where the last
  one ended, instead of a scan and a sort of the whole selection per page.
  Partial, like the retention index: a new row is pending, so the insert
  path pays nothing; marking a row published adds its entry (that update is
  never a HOT one anyway: status is indexed already).
- Built CONCURRENTLY, outside a transaction, so upgrading a live outbox does
  not block writes. A build interrupted half way leaves an invalid index:
  it is dropped and built again.
- A partitioned outbox (docs/producing.md): PostgreSQL cannot build an index
  concurrently on a partitioned table, so each partition gets its own,
  concurrently, and they are attached to an index created ON ONLY the
  partitioned tables; partitions created later get theirs with them.

Revision ID: 0006_outbox_republish_index
Revises: 0005_outbox_headers
"""
import sqlalchemy as sa
from alembic import op

revision = "0006_outbox_republish_index"
down_revision = "0005_outbox_headers"
branch_labels = None
depends_on = None

INDEX = "ix_event_outbox_created_at_id"
ON = "(created_at, id) WHERE status = 'published'"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def drop_if_invalid(bind, name: str) -> None:
    invalid = bind.execute(
        sa.text(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace "
            "AND NOT i.indisvalid AND c.relkind = 'i'"
        ),
        {"name": name},
    ).first()
    if invalid:
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(name)}")


def is_partitioned(bind) -> bool:
    return bind.execute(
        sa.text("SELECT relkind = 'p' FROM pg_class WHERE oid = 'event_outbox'::regclass")
    ).scalar()


def upgrade() -> None:
    bind = op.get_bind()
    with op.get_context().autocommit_block():
        if not is_partitioned(bind):
            drop_if_invalid(bind, INDEX)
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON event_outbox {ON}")
            return
        # The partition tree, parents first: (table, its parent, leaf?).
        tree = bind.execute(
            sa.text(
                "SELECT c.relname, p.relname, t.isleaf FROM pg_partition_tree('event_outbox') t "
                "JOIN pg_class c ON c.oid = t.relid LEFT JOIN pg_class p ON p.oid = t.parentrelid "
                "ORDER BY t.level"
            )
        ).all()
        index = {table: INDEX if parent is None else f"{table}_created_at_id"[:63] for table, parent, _ in tree}
        for table, _, leaf in tree:
            if leaf:
                drop_if_invalid(bind, index[table])
                op.execute(
                    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote(index[table])} ON {quote(table)} {ON}"
                )
            else:
                op.execute(f"CREATE INDEX IF NOT EXISTS {quote(index[table])} ON ONLY {quote(table)} {ON}")
        # Children first: a parent's index turns valid once all of its
        # partitions' indexes are attached.
        for table, parent, _ in reversed(tree):
            if parent is not None:
                attached = bind.execute(
                    sa.text(
                        "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(:child) "
                        "AND inhparent = to_regclass(:parent)"
                    ),
                    {"child": quote(index[table]), "parent": quote(index[parent])},
                ).first()
                if not attached:
                    op.execute(f"ALTER INDEX {quote(index[parent])} ATTACH PARTITION {quote(index[table])}")


def downgrade() -> None:
    bind = op.get_bind()
    with op.get_context().autocommit_block():
        # A partitioned index cannot be dropped concurrently; dropping it
        # drops its partitions' indexes too.
        concurrently = "" if is_partitioned(bind) else "CONCURRENTLY "
        op.execute(f"DROP INDEX {concurrently}IF EXISTS {INDEX}")
