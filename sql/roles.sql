-- A least-privilege role for the tailer. Run as a superuser after the schema
-- exists, then give it a password (ALTER ROLE outbox_tailer PASSWORD '...') or
-- a pg_hba.conf rule that fits your site:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/roles.sql
--
-- REPLICATION: to create and stream from the logical replication slot.
-- event_outbox: read events (sweeper, status) and write back only the
--   delivery columns; it never inserts, deletes or rewrites an event.
-- event_logs: insert the projection of published events (ON CONFLICT DO NOTHING
--   needs only INSERT) and read it back.
-- outbox_prune: retention (prune, --retention) deletes published rows only
--   through this function (SECURITY DEFINER); the role has no DELETE.
-- No access to messages: the tailer never reads the domain table.
-- The publication is created by the migrations (it needs the table's owner).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_tailer') THEN
        CREATE ROLE outbox_tailer WITH LOGIN REPLICATION;
    ELSE
        ALTER ROLE outbox_tailer WITH LOGIN REPLICATION;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO outbox_tailer;
GRANT SELECT ON event_outbox TO outbox_tailer;
GRANT UPDATE (status, retry_count, next_retry_at, published_at, last_error) ON event_outbox TO outbox_tailer;
GRANT SELECT, INSERT ON event_logs TO outbox_tailer;
GRANT EXECUTE ON FUNCTION outbox_prune(interval, integer) TO outbox_tailer;
