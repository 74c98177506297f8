"""Command line: ``python -m stripe_emulator --port N [options]``.

Options: ``--host`` (default 127.0.0.1), ``--port`` (0 picks a free port),
``--api-key`` (repeatable; default ``sk_test_emulator`` or the comma-separated
``STRIPE_EMULATOR_API_KEY``), ``--webhook-url`` and ``--webhook-secret``,
``--max-bulk-lines`` (default 50), ``--public-url`` (base of the hosted invoice /
billing-portal URLs; default ``http://HOST:PORT``), ``--payment-delay SECONDS``
(finalization to first automatic payment attempt; default 3600),
``--portal-default-configuration`` (the account has a default customer-portal
configuration, as after saving the portal settings in the Dashboard),
``--rate-limit N`` (requests per second, reads and writes together; default off),
``--parent-pid`` (exit when that process is no longer the parent: set by
:func:`~stripe_emulator.process.start_emulator`), ``--state-file PATH`` (keep the
objects across restarts: see :mod:`stripe_emulator.state`).

A port already in use is an error (exit 2) naming the port.

Prints one line ``stripe-emulator ready url=http://HOST:PORT pid=PID`` on stdout when
it accepts connections, then serves until SIGTERM or SIGINT and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import sys
import threading
import time

from . import DEFAULT_API_KEY, state
from .server import make_server


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    ap = argparse.ArgumentParser(prog="python -m stripe_emulator", description="Stateful Stripe API emulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=12111)
    ap.add_argument("--api-key", action="append", dest="api_keys", help="accepted secret key (repeatable)")
    ap.add_argument("--webhook-url")
    ap.add_argument("--webhook-secret")
    ap.add_argument("--max-bulk-lines", type=int, default=50)
    ap.add_argument("--public-url")
    ap.add_argument(
        "--payment-delay", type=float, default=3600, metavar="SECONDS", help="finalization to first payment attempt"
    )
    ap.add_argument(
        "--portal-default-configuration",
        action="store_true",
        help="the account has a default customer-portal configuration (as saved in the Dashboard)",
    )
    ap.add_argument("--rate-limit", type=float, metavar="N", help="requests per second, reads and writes together")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is no longer our parent")
    ap.add_argument("--state-file", help="read the state from this file at start and keep it written there")
    args = ap.parse_args(argv)
    if not args.api_keys:
        env = os.environ.get("STRIPE_EMULATOR_API_KEY")
        args.api_keys = [k.strip() for k in env.split(",") if k.strip()] if env else [DEFAULT_API_KEY]
    if args.webhook_url and not args.webhook_secret:
        ap.error("--webhook-url needs --webhook-secret")
    if args.payment_delay < 0:
        ap.error("--payment-delay must be >= 0")
    if args.rate_limit is not None and args.rate_limit < 0:
        ap.error("--rate-limit must be >= 0")
    return args


def main(argv=None) -> int:
    """Run the emulator until SIGTERM/SIGINT."""
    args = parse_args(argv)
    # The emulator keeps many small long-lived dicts (objects, events); the default
    # GC thresholds make it rescan them constantly. Collect far less often.
    gc.set_threshold(100_000, 50, 1000)
    try:
        server = make_server(
        args.host,
        args.port,
        api_keys=args.api_keys,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        max_bulk_lines=args.max_bulk_lines,
        base_url=args.public_url,
        payment_delay=args.payment_delay,
        portal_default_configuration=args.portal_default_configuration,
        rate_limit=args.rate_limit or None,
        )
    except OSError as error:
        print(f"stripe-emulator: cannot listen on {args.host}:{args.port}: {error.strerror or error}"
              + (" (another process uses it; pick another with --port)" if error.errno == errno.EADDRINUSE else ""),
              file=sys.stderr, flush=True)
        return 2
    if args.state_file:
        try:
            loaded = state.load(server.emulator, args.state_file)
        except ValueError as error:
            print(f"stripe-emulator: {error}", file=sys.stderr, flush=True)
            return 2
        if loaded:
            print(f"stripe-emulator: state read from {args.state_file}", file=sys.stderr, flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    url = f"http://{host}:{server.server_address[1]}"
    print(f"stripe-emulator ready url={url} pid={os.getpid()}", flush=True)
    saved_mark = state.change_mark(server.emulator) if args.state_file else None
    last_save = time.monotonic()
    while not stop.wait(0.5):
        if args.parent_pid and os.getppid() != args.parent_pid:
            break  # the process that started us is gone
        if args.state_file and time.monotonic() - last_save >= state.SAVE_EVERY_SECONDS:
            last_save = time.monotonic()
            mark = state.change_mark(server.emulator)
            if mark != saved_mark:
                state.save(server.emulator, args.state_file)
                saved_mark = mark

    server.shutdown()
    server.server_close()
    server.emulator.shutdown()
    if args.state_file:
        state.save(server.emulator, args.state_file)
    print("stripe-emulator stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
