"""Counts from the fuzz and the sweeps, for `python -m tests.security_report`: each test
adds its section to the JSON file named by SECURITY_STATS (nothing when it is unset)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def record_stats(section: str, data: dict) -> None:
    path = os.environ.get("SECURITY_STATS")
    if not path:
        return
    file = Path(path)
    stats = json.loads(file.read_text()) if file.exists() else {}
    stats[section] = data
    file.write_text(json.dumps(stats, indent=2, sort_keys=True))
