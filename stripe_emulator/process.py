"""Start the emulator as a subprocess (for tests, benchmarks and the run command).

    from stripe_emulator.process import start_emulator
    emu = start_emulator()                 # free port, default key
    client = stripe.StripeClient(emu.api_key, base_addresses={"api": emu.url})
    emu.control.advance_clock(3600)
    emu.stop()

``start_emulator`` runs ``sys.executable -m stripe_emulator`` on a free port (or the
one given), waits until it answers, and returns an :class:`EmulatorProcess`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from .control import EmulatorControl


class EmulatorProcess:
    """A running emulator subprocess: ``url``, ``api_key``, ``pid``, ``control``, ``stop()``."""

    def __init__(self, proc: subprocess.Popen, url: str, api_key: str) -> None:
        self.proc = proc
        self.url = url
        self.api_key = api_key
        self.pid = proc.pid
        self.control = EmulatorControl(url)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_emulator(
    port: int | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    api_key: str = "sk_test_emulator",
    extra_args=(),
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    stderr=None,
    exit_with_parent: bool = True,
    payment_delay: float | None = None,
    portal_default_configuration: bool = False,
    rate_limit: float | None = None,
) -> EmulatorProcess:
    """Start ``python -m stripe_emulator`` and wait until it answers.

    ``port=None`` lets the emulator pick a free port (it reports it on its ready
    line). ``extra_args`` are appended to the command line (e.g.
    ``["--max-bulk-lines", "10"]``). ``stderr`` is passed to ``subprocess.Popen``
    (default: inherited). With ``exit_with_parent`` the emulator stops by itself
    when this process dies (no orphan emulators after a crashed test run).
    ``payment_delay`` (seconds from finalization to the first automatic payment
    attempt, default 3600), ``portal_default_configuration`` (the account has a
    default customer-portal configuration) and ``rate_limit`` (requests per second,
    reads and writes together; default off) become ``--payment-delay``,
    ``--portal-default-configuration`` and ``--rate-limit``; ``reset()`` keeps them.
    """
    cmd = [sys.executable, "-m", "stripe_emulator", "--host", host, "--port", str(port or 0), "--api-key", api_key]
    if webhook_url:
        cmd += ["--webhook-url", webhook_url, "--webhook-secret", webhook_secret or "whsec_emulator"]
    if exit_with_parent:
        cmd += ["--parent-pid", str(os.getpid())]
    if payment_delay is not None:
        cmd += ["--payment-delay", str(payment_delay)]
    if portal_default_configuration:
        cmd += ["--portal-default-configuration"]
    if rate_limit:
        cmd += ["--rate-limit", str(rate_limit)]
    cmd += list(extra_args)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
    line_box: list[str] = []

    def read_ready():
        line_box.append(proc.stdout.readline())
        for _ in proc.stdout:  # keep draining so the child never blocks on stdout
            pass

    threading.Thread(target=read_ready, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not line_box:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"stripe emulator did not start (exit code {proc.poll()})")
        time.sleep(0.02)
    line = line_box[0]
    url = next((tok[4:] for tok in line.split() if tok.startswith("url=")), None)
    if not url:
        proc.kill()
        raise RuntimeError(f"unexpected ready line from the emulator: {line!r}")
    while True:
        try:
            with urllib.request.urlopen(url + "/_emulator/clock", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("stripe emulator did not answer") from None
            time.sleep(0.05)
    return EmulatorProcess(proc, url, api_key)
