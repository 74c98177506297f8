"""Engine tuning per backend."""
from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.engine import Engine


def configure_engine(engine: Engine) -> None:
    """SQLite (the embedded default) gets foreign keys, WAL, a busy timeout, and
    transactions that take the write lock when they begin (BEGIN IMMEDIATE): a
    read-then-write transaction could otherwise fail to upgrade its lock while the
    web process, a worker and the scheduler share the file."""
    if engine.dialect.name != "sqlite":
        return

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
