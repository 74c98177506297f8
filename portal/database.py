"""Engine tuning per backend."""
from __future__ import annotations

import os

from sqlalchemy import event
from sqlalchemy.engine import Engine


def configure_engine(engine: Engine) -> None:
    """SQLite (the embedded default) gets foreign keys, WAL, a busy timeout, and
    transactions that take the write lock when they begin (BEGIN IMMEDIATE): a
    read-then-write transaction could otherwise fail to upgrade its lock while the
    web process, a worker and the scheduler share the file."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "do_connect")
    def _create_private(_dialect, _record, _cargs, _cparams):
        create_private_file(engine.url.database, engine.url.query)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA busy_timeout = 15000")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_private_file(database: str | None, query=None) -> None:
    """Create a SQLite database file readable and writable by its owner only (0600)
    before SQLite opens it; SQLite would create it with the umask's mode (usually
    0644: readable by every local user). Its -wal and -shm files take the database
    file's mode. An existing file, an in-memory database or a URI filename is left
    as it is."""
    if not database or database == ":memory:" or (query or {}).get("uri") or database.startswith("file:"):
        return
    try:
        descriptor = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # e.g. the folder is missing: SQLite reports it when it opens the file
    os.close(descriptor)


class RetryTransaction(Exception):
    """Raised inside a transaction whose reads went stale: roll back and run it again."""


def retry_on_deadlock(transaction, attempts: int = 5):
    """Run `transaction` (which commits) again if the database chose it as a deadlock
    or serialization victim, or it raised RetryTransaction; everything it did was
    rolled back, so it is safe to rerun."""
    import random
    import time

    from sqlalchemy.exc import DBAPIError

    from portal.extensions import db

    for attempt in range(attempts):
        try:
            return transaction()
        except RetryTransaction:
            db.session.rollback()
            if attempt == attempts - 1:
                raise
            continue
        except DBAPIError as error:
            db.session.rollback()
            code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
            if code not in ("40P01", "40001") or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0, 0.02 * 2**attempt))
