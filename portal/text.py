"""Text the portal stores or looks up: names, slugs, ids and reasons must not carry
control characters (NUL, which PostgreSQL cannot store at all, newlines, escapes)."""
from __future__ import annotations

import re

# C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The same, less tab, line feed and carriage return (for free text whose whitespace
# is collapsed anyway, such as a credit's reason typed into a text area).
_CONTROL_NOT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def has_control_characters(text: str, *, allow_whitespace: bool = False) -> bool:
    """Whether `text` holds a control character (tab, CR and LF allowed if asked)."""
    return bool((_CONTROL_NOT_WHITESPACE if allow_whitespace else _CONTROL).search(text))
