"""Migrations upgrade a database that holds data, not only an empty one."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def flask(database: Path, *args: str) -> str:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{database}", "SECRET_KEY": "x"}
    result = subprocess.run([str(Path(sys.executable).parent / "flask"), "--app", "wsgi", "db", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_a_populated_sqlite_database_upgrades_downgrades_and_upgrades_again(tmp_path):
    database = tmp_path / "portal.db"
    flask(database, "upgrade", "0001")
    with sqlite3.connect(database) as connection:
        t = "'2026-11-01 00:00:00'"
        connection.executescript(f"""
            INSERT INTO organizations (id, slug, name, billing_email, currency, cycle_anchor_day, created_at)
                VALUES (1, 'a', 'A', 'a@example.com', 'usd', 1, {t});
            INSERT INTO products (id, code, name, unit, unit_price, kind, active)
                VALUES (1, 'p', 'P', 'u', '1', 'metered', 1);
            INSERT INTO invoices (id, organization_id, period_start, period_end, status, currency, total_cents,
                change_seq, synced_seq, created_at)
                VALUES (1, 1, {t}, '2026-12-01 00:00:00', 'open', 'usd', 5, 1, 0, {t});
            INSERT INTO invoice_items (id, invoice_id, product_id, line_key, resource, description, quantity,
                unit_price, amount_cents, version, updated_at)
                VALUES (1, 1, 1, 'p||', '', 'P', '5', '1', 5, 2, {t});
        """)
    flask(database, "upgrade")
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT total_cents, payment_attempts FROM invoices").fetchone() == (5, 0)
        assert connection.execute("SELECT amount_cents FROM invoice_items").fetchone() == (5,)
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    assert "No new upgrade operations detected" in flask(database, "check")


def test_audit_entries_gain_what_they_were_about_and_become_append_only_on_sqlite(tmp_path):
    database = tmp_path / "portal.db"
    flask(database, "upgrade", "0006")
    with sqlite3.connect(database) as connection:
        t = "'2026-11-01 00:00:00'"
        connection.executescript(f"""
            INSERT INTO organizations (id, slug, name, billing_email, currency, cycle_anchor_day, created_at)
                VALUES (7, 'a', 'A', 'a@example.com', 'usd', 1, {t});
            INSERT INTO invoices (id, organization_id, period_start, period_end, status, currency, total_cents,
                change_seq, synced_seq, created_at)
                VALUES (3, 7, {t}, '2026-12-01 00:00:00', 'open', 'usd', 0, 0, 0, {t});
            INSERT INTO audit_entries (actor, action, object_type, object_id, details, created_at)
                VALUES ('staff@example.com', 'invoice.sync_now', 'invoice', '3', '{{}}', {t});
        """)
    flask(database, "upgrade")
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT organization_id, invoice_id FROM audit_entries").fetchone() == (7, 3)
        for statement in ("UPDATE audit_entries SET action = 'x'", "DELETE FROM audit_entries"):
            try:
                connection.execute(statement)
            except sqlite3.IntegrityError as refused:
                assert "append-only" in str(refused)
            else:
                raise AssertionError(f"{statement} went through")
    flask(database, "downgrade", "0006")
    with sqlite3.connect(database) as connection:
        connection.execute("DELETE FROM audit_entries")  # the triggers went with the downgrade
    assert "No new upgrade operations detected" in flask(database, "upgrade") + flask(database, "check")
