-- outbox-tailer schema, for people who don't run Alembic.
-- It must stay identical to `alembic upgrade head` (tests/schema.rs compares
-- the two with pg_dump --schema-only). Apply with:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/schema.sql
BEGIN;

-- The chat domain table: the source of truth for chat.
CREATE TABLE messages (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    project_id uuid NOT NULL,
    user_id uuid NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT messages_pkey PRIMARY KEY (id)
);

-- The transactional outbox: written in the same transaction as messages.
CREATE TABLE event_outbox (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    user_id uuid,
    project_id uuid,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    status text DEFAULT 'pending' NOT NULL,
    retry_count integer DEFAULT 0 NOT NULL,
    next_retry_at timestamp with time zone DEFAULT now() NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    published_at timestamp with time zone,
    last_error text,
    -- Message headers of the event's own: a JSON object of strings (the
    -- rules on names and values are the tailer's, docs/contract.md section 3).
    headers jsonb,
    CONSTRAINT event_outbox_pkey PRIMARY KEY (id),
    CONSTRAINT ck_event_outbox_status CHECK (status IN ('pending', 'published', 'failed')),
    CONSTRAINT ck_event_outbox_headers CHECK (headers IS NULL OR (jsonb_typeof(headers) = 'object'
        AND NOT jsonb_path_exists(headers, '$.* ? (@.type() != "string")')))
);

CREATE INDEX ix_event_outbox_status_next_retry_at_created_at ON event_outbox (status, next_retry_at, created_at);
CREATE INDEX ix_event_outbox_aggregate_id_created_at ON event_outbox (aggregate_id, created_at);
CREATE INDEX ix_event_outbox_project_id_created_at ON event_outbox (project_id, created_at);
CREATE INDEX ix_event_outbox_user_id_created_at ON event_outbox (user_id, created_at);
-- Retention (prune, --retention) deletes published rows through this index.
CREATE INDEX ix_event_outbox_published_at ON event_outbox (published_at) WHERE status = 'published';
-- Republish reads published rows in (created_at, id) pages through this index.
CREATE INDEX ix_event_outbox_created_at_id ON event_outbox (created_at, id) WHERE status = 'published';

-- Inserts only: status updates must never reach the tailer's slot.
-- Via the partition root: a partitioned event_outbox streams like a plain one.
CREATE PUBLICATION event_outbox_pub FOR TABLE event_outbox WITH (publish = 'insert', publish_via_partition_root = true);

-- Optional analytics/audit projection of published events.
CREATE TABLE event_logs (
    event_id uuid NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    user_id uuid,
    project_id uuid,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamp with time zone NOT NULL,
    published_at timestamp with time zone NOT NULL,
    CONSTRAINT event_logs_pkey PRIMARY KEY (event_id)
);

CREATE INDEX ix_event_logs_aggregate_id_created_at ON event_logs (aggregate_id, created_at);
CREATE INDEX ix_event_logs_project_id_created_at ON event_logs (project_id, created_at);
CREATE INDEX ix_event_logs_user_id_created_at ON event_logs (user_id, created_at);

-- Retention: deletes at most `batch` published rows older than `older_than`,
-- oldest first. SECURITY DEFINER: the tailer's role gets EXECUTE on it and no
-- DELETE on the table, so retention can never touch a pending or failed row.
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
$$;
REVOKE ALL ON FUNCTION outbox_prune(interval, integer) FROM PUBLIC;

COMMIT;
