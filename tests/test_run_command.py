"""The README's run command: everything up with demo data, and Ctrl-C leaves nothing."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_run_command_serves_demo_and_ctrl_c_stops_every_child(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in {"REDIS_URL", "DATABASE_URL", "SECRET_KEY", "PORTAL_API_TOKENS", "STRIPE_API_KEY"}}
    port = free_port()
    env.update(PORT=str(port), STRIPE_EMULATOR_PORT=str(free_port()), PORTAL_INSTANCE_DIR=str(tmp_path / "instance"))
    log = (tmp_path / "run.log").open("w+")
    process = subprocess.Popen([sys.executable, "run.py"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        address = None
        while time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"Billing portal: (http://\S+/login)", (tmp_path / "run.log").read_text())
            if match:
                address = match.group(1)
                break
            time.sleep(0.2)
        assert address, (tmp_path / "run.log").read_text()
        with urllib.request.urlopen(address, timeout=5) as response:
            assert response.status == 200 and b"Sign in" in response.read()
        output = (tmp_path / "run.log").read_text()
        assert "alice@example.com" in output and "support@example.com" in output
        stripe_base = re.search(r"Stripe: the emulator at (http://\S+)", output).group(1)
        request = urllib.request.Request(stripe_base + "/v1/customers",
                                         headers={"Authorization": "Bearer sk_test_emulator"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        # The periodic sweep creates the demo's Stripe customers, each with Stripe's test
        # Visa card as its default payment method, so the demo's invoices get paid.
        customers: list = []
        while time.monotonic() < deadline + 60 and len(customers) < 2:
            with urllib.request.urlopen(request, timeout=5) as response:
                customers = json.loads(response.read())["data"]
            time.sleep(0.5)
        assert len(customers) == 2, customers
        assert all(c["invoice_settings"]["default_payment_method"] for c in customers), customers
        # The worker's syncs are counted into PROMETHEUS_MULTIPROC_DIR, which run.py
        # emptied at start: the web's /metrics (loopback: no token) adds them up.
        metrics_url = address.replace("/login", "/metrics")
        synced = 0.0
        while time.monotonic() < deadline + 90 and not synced:
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                text = response.read().decode()
            synced = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith('portal_sync_runs_total{outcome="synced"}'))
            time.sleep(0.5)
        assert synced >= 2, text
        assert list((tmp_path / "instance" / "metrics").glob("counter_*.db"))
        spawned = _descendants(process.pid)
        assert len(spawned) >= 5  # redis, Stripe emulator, worker, scheduler, web (and their children)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        time.sleep(0.5)
        left = {pid for pid in spawned if _alive(pid)}
        assert not left, f"processes left behind: {left}"
    finally:
        if process.poll() is None:
            for pid in _descendants(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
        log.close()


def test_an_idle_worker_stops_at_once_on_sigterm(tmp_path, redis_url):
    """Ctrl-C in the run command is a SIGTERM to the worker: an idle worker ends at
    once instead of taking it for a lost Redis and serving again."""
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'portal.db'}", "SECRET_KEY": "x",
           "REDIS_URL": redis_url}
    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen([str(Path(sys.executable).parent / "rq"), "worker", "-w", "jobs.worker.PortalWorker",
                               "sweeps", "sync", "webhooks", "default", "--url", redis_url],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Listening on" not in (tmp_path / "worker.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "Listening on" in (tmp_path / "worker.log").read_text()
        worker.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert worker.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 5
        assert "serving again" not in (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()


def test_a_taken_emulator_port_stops_the_start_with_a_clear_message(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {key: value for key, value in os.environ.items() if key not in {"STRIPE_API_KEY", "REDIS_URL"}}
        env.update(PORT=str(free_port()), STRIPE_EMULATOR_PORT=str(port), PORTAL_INSTANCE_DIR=str(tmp_path / "i"))
        result = subprocess.run([sys.executable, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 1
    assert f"port {port} (the Stripe emulator) is in use" in result.stdout
    assert "STRIPE_EMULATOR_PORT=" in result.stdout and "started" not in result.stdout
