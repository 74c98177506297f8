"""A stateful stand-in for the Stripe API, spoken to over real HTTP.

Start it with ``python -m stripe_emulator --port N`` (see :mod:`stripe_emulator.__main__`)
or, from Python/tests, with :func:`stripe_emulator.process.start_emulator`. Point the
official ``stripe`` library at it (``stripe.StripeClient(key, base_addresses={"api":
url})`` or ``stripe.api_base = url``). Drive its clock, faults, webhooks and state
through the control API under ``/_emulator/`` (client: :mod:`stripe_emulator.control`).

Modules: ``server`` (HTTP, routing, request pipeline), ``params`` (form decoding and
validation from ``stripe.params``), ``store`` (customers, invoices, items, lines,
events, the clock-driven scheduler), ``payment_methods`` (test cards, attaching),
``payments`` (finalization, balance, minimum charge, payment attempts and retries),
``portal`` (customer-portal configurations and sessions), ``objects`` (JSON shapes),
``idempotency``, ``faults``, ``ratelimit`` (Stripe's combined rate limit),
``webhooks``, ``clock``, ``pages`` (hosted invoice page, PDF, billing portal page),
``account`` (the account, webhook endpoints, tax settings, coupons), ``state`` (the
optional state file), ``process`` (launcher), ``control`` (control-API client).

This package never imports the portal.
"""

DEFAULT_API_KEY = "sk_test_emulator"
