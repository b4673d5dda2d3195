"""Alembic environment for outbox-tailer.

The connection URL comes from DATABASE_URL, a plain libpq URL
(postgresql://user:pass@host:port/db), the same value the tailer reads.
"""
import os
import sys

from alembic import context
from sqlalchemy import create_engine, pool


def database_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        sys.exit("alembic: DATABASE_URL is not set (e.g. postgresql://user@127.0.0.1:5432/chat)")
    # libpq accepts both schemes; SQLAlchemy only the long one.
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if not url.startswith("postgresql://"):
        sys.exit("alembic: DATABASE_URL must be a postgresql:// URL")
    return url


def run_offline() -> None:
    context.configure(url=database_url(), literal_binds=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
