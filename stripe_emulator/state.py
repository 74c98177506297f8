"""The emulator's state in a file, so a restarted emulator still has its objects.

``--state-file PATH``: the state is read from PATH at start (when it exists), written
every few seconds after a change and once more on SIGTERM/SIGINT. It holds every
object and event, the id counter, the emulated clock's offset and the stored
idempotency keys; not the request log, faults, webhook deliveries still queued, or
the settings (those come from the command line). The file is a pickle: keep it where
only its owner writes (the run command keeps it in the 0700 instance folder).
Written to a temporary file first and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import itertools
import os
import pickle
from pathlib import Path

FORMAT = "stripe-emulator-state/1"
SAVE_EVERY_SECONDS = 2.0
# Store attributes that make up the state (see Store.reset and its mixins).
STORE_FIELDS = (
    "customers", "invoices", "items", "lines", "events", "fail_customers", "_due",
    "payment_methods", "portal_configurations", "sessions", "webhook_endpoints", "coupons",
)


def change_mark(emulator) -> tuple:
    """Something that differs whenever the state may have changed."""
    store = emulator.store
    last_event = store.events[-1]["_seq"] if store.events else 0
    return emulator.request_count, last_event, emulator.clock.offset


def save(emulator, path: str | os.PathLike) -> None:
    """Write the state to `path` atomically."""
    store = emulator.store
    with store.lock:
        counter = next(store._counter)
        store._counter = itertools.count(counter + 1)
        state = {
            "format": FORMAT,
            "store": {name: getattr(store, name) for name in STORE_FIELDS},
            "tag": store._tag,
            "counter": counter + 1,
            "clock_offset": emulator.clock.offset,
            "idempotency": emulator.idempotency.snapshot(),
        }
        data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def load(emulator, path: str | os.PathLike) -> bool:
    """Read the state from `path` if it exists; False if there was none. A file that is
    not an emulator state is an error (ValueError), never silently ignored."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        state = pickle.loads(path.read_bytes())  # noqa: S301 - the operator's own file
    except Exception as error:
        raise ValueError(f"{path} is not a readable emulator state file: {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an emulator state file of format {FORMAT}")
    store = emulator.store
    with store.lock:
        for name, value in state["store"].items():
            setattr(store, name, value)
        store.events_by_id = {rec["id"]: rec for rec in store.events}
        store._tag = state["tag"]
        store._counter = itertools.count(state["counter"])
        emulator.clock.restore_offset(state["clock_offset"])
        emulator.idempotency.restore(state["idempotency"])
    return True
