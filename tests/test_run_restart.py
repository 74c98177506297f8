"""The demo survives Ctrl-C: after a restart, syncs still reach Stripe's objects, the
payment-methods page opens, and hosted invoice links still answer; the console shows
only what a user needs, the rest is in instance/logs/."""
from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from http.cookiejar import CookieJar
from pathlib import Path

from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120


class RunCommand:
    """`python3 run.py` started in the background, its console kept in a file."""

    def __init__(self, env: dict[str, str], console: Path):
        self.console = console
        self.output = console.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "run.py"], cwd=ROOT, env=env, stdout=self.output,
                                        stderr=subprocess.STDOUT)

    def wait_until_serving(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            match = re.search(r"Billing portal: (http://\S+)/login", self.console.read_text())
            if match:
                return match.group(1)
            time.sleep(0.2)
        raise AssertionError(f"the run command did not serve:\n{self.console.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            assert self.process.wait(timeout=60) == 0, self.console.read_text()
        self.output.close()


def _cli(env: dict[str, str], instance: Path, stripe_base: str, *args: str) -> str:
    """A `flask --app wsgi` command against the run command's database and Stripe."""
    env = {**env, "DATABASE_URL": f"sqlite:///{instance / 'portal.db'}", "SECRET_KEY": "cli",
           "STRIPE_API_KEY": "sk_test_emulator", "STRIPE_API_BASE": stripe_base}
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _api(base: str, token: str, path: str) -> dict | list:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _csrf(page: str) -> str:
    return html.unescape(re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1))


def _open_payment_methods(base: str, slug: str) -> str:
    """Sign in as the demo owner and press "Manage payment methods"; returns where it leads."""
    jar = CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login_page = browser.open(base + "/login", timeout=10).read().decode()
    form = {"email": "alice@example.com", "password": "demo-password", "csrf_token": _csrf(login_page)}
    browser.open(base + "/login", urllib.parse.urlencode(form).encode(), timeout=30)
    billing = browser.open(f"{base}/orgs/{slug}/billing", timeout=10).read().decode()
    no_redirect = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect)
    try:
        no_redirect.open(f"{base}/orgs/{slug}/billing/payment-methods",
                         urllib.parse.urlencode({"csrf_token": _csrf(billing)}).encode(), timeout=60)
    except urllib.error.HTTPError as answer:
        assert answer.code == 303, answer.read().decode()
        return answer.headers["Location"]
    raise AssertionError("Manage payment methods did not redirect")


def test_the_demo_carries_on_after_ctrl_c(tmp_path, redis_url):
    instance = tmp_path / "instance"
    env = {key: value for key, value in os.environ.items()
           if key not in {"DATABASE_URL", "SECRET_KEY", "PORTAL_API_TOKENS", "STRIPE_API_KEY"}}
    stripe_port = free_port()
    env.update(PORT=str(free_port()), STRIPE_EMULATOR_PORT=str(stripe_port), PORTAL_INSTANCE_DIR=str(instance),
               REDIS_URL=redis_url)
    stripe_base = f"http://127.0.0.1:{stripe_port}"

    first = RunCommand(env, tmp_path / "first.log")
    try:
        base = first.wait_until_serving()
        console = first.console.read_text()
        token = (instance / "api_token").read_text().strip()
        assert f"API token (Authorization: Bearer ...): {token}" in console
        assert f"Logs: {instance / 'logs'}/" in console and "python3 run.py logs" in console
        assert "Registering birth" not in console and "Demo data created" not in console
        assert "Registering birth" in (instance / "logs" / "scheduler.log").read_text()
        # A finished cycle with Stripe's hosted invoice page, made before the restart.
        assert "finalized" in _cli(env, instance, stripe_base, "close-cycle", "--org", "globex")
    finally:
        first.stop()
    [closed] = [invoice for invoice in _api_offline(instance) if invoice["status"] != "open"]
    assert closed["hosted_invoice_url"].startswith(stripe_base + "/i/")

    second = RunCommand(env, tmp_path / "second.log")
    try:
        base = second.wait_until_serving()
        restart_seconds = time.monotonic() - second.started
        with urllib.request.urlopen(base + "/login", timeout=10) as response:
            assert response.status == 200
        # The README's API example works as pasted (only the port differs here).
        before = _api(base, token, "/api/v1/organizations/acme/invoices/current")
        answers = _run_readme_api_example(base, cwd=tmp_path)
        assert answers[0] == {"accepted": 1, "duplicates": 0}
        egress = {item["product"]: Decimal(item["quantity"]) for item in answers[1]["items"]}["egress.gb"]
        assert egress == {item["product"]: Decimal(item["quantity"])
                          for item in before["items"]}["egress.gb"] + Decimal("12.5")
        # A sync after the restart finds the Stripe customer and draft it made before.
        usage = {"events": [{"id": "after-restart-1", "organization": "acme", "product": "egress.gb",
                             "quantity": "10", "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]}
        request = urllib.request.Request(base + "/api/v1/usage", json.dumps(usage).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"accepted": 1, "duplicates": 0}
        current = _api(base, token, "/api/v1/organizations/acme/invoices/current")
        output = _cli(env, instance, stripe_base, "sync", "--invoice", str(current["id"]), "--now")
        assert f"invoice {current['id']}: synced" in output, output
        assert "created again" not in output
        # "Manage payment methods" opens Stripe's portal for the same customer.
        location = _open_payment_methods(base, "acme")
        assert location.startswith(stripe_base + "/p/session/bps_")
        with urllib.request.urlopen(location, timeout=10) as response:
            assert response.status == 200 and b"Acme Cloud" in response.read()
        # The hosted invoice page and PDF made before the restart still answer.
        for link in (closed["hosted_invoice_url"], closed["invoice_pdf"]):
            with urllib.request.urlopen(link, timeout=10) as response:
                assert response.status == 200
        print(f"run command restarted and served in {restart_seconds:.1f} s")
    finally:
        second.stop()


def _run_readme_api_example(base: str, cwd: Path) -> list:
    """The README's "Try the API" lines, run by bash in a folder holding instance/."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Try the API"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    assert len(block.strip().splitlines()) == 5
    result = subprocess.run(["bash", "-c", block.replace("http://127.0.0.1:8000", base)], cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    decoder, text, answers = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        answer, end = decoder.raw_decode(text)
        answers.append(answer)
        text = text[end:].strip()
    return answers


def _api_offline(instance: Path) -> list[dict]:
    """Globex's invoices as the database holds them while nothing runs."""
    import sqlite3

    with sqlite3.connect(instance / "portal.db") as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(
            "SELECT i.status, i.hosted_invoice_url, i.invoice_pdf FROM invoices i "
            "JOIN organizations o ON o.id = i.organization_id WHERE o.slug = 'globex'")]
