"""Password hashing: argon2id at the strength OWASP ASVS asks for.

The cost comes from the app's config (`ARGON2_TIME_COST`, `ARGON2_MEMORY_COST` in KiB,
`ARGON2_PARALLELISM`); production defaults are argon2-cffi's RFC 9106 low-memory
profile (t=3, 64 MiB, p=4), above OWASP's minimum (t=2, 19 MiB, p=1). A hash made by
an older scheme (Werkzeug's scrypt or pbkdf2) or at a lower cost still verifies, and
`needs_rehash` says to replace it: the sign-in does, with the password it just checked.
"""
from __future__ import annotations

from functools import lru_cache

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from flask import current_app, has_app_context
from werkzeug.security import check_password_hash

# argon2-cffi's defaults (RFC 9106, second recommended option).
DEFAULT_TIME_COST = 3
DEFAULT_MEMORY_COST = 64 * 1024
DEFAULT_PARALLELISM = 4
ARGON2_PREFIX = "$argon2"


def _parameters() -> tuple[int, int, int]:
    config = current_app.config if has_app_context() else {}
    return (int(config.get("ARGON2_TIME_COST", DEFAULT_TIME_COST)),
            int(config.get("ARGON2_MEMORY_COST", DEFAULT_MEMORY_COST)),
            int(config.get("ARGON2_PARALLELISM", DEFAULT_PARALLELISM)))


@lru_cache(maxsize=8)
def _hasher(time_cost: int, memory_cost: int, parallelism: int) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID)


@lru_cache(maxsize=8)
def _dummy_hash(time_cost: int, memory_cost: int, parallelism: int) -> str:
    return _hasher(time_cost, memory_cost, parallelism).hash("not a password anyone has")


def hasher() -> PasswordHasher:
    return _hasher(*_parameters())


def hash_password(password: str) -> str:
    return hasher().hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    if stored_hash.startswith(ARGON2_PREFIX):
        try:
            return hasher().verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
    # A hash from before argon2id (Werkzeug's `scrypt:...` or `pbkdf2:...`).
    try:
        return check_password_hash(stored_hash, password)
    except ValueError:
        return False


def needs_rehash(stored_hash: str) -> bool:
    if not stored_hash.startswith(ARGON2_PREFIX):
        return True
    try:
        return hasher().check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def verify_dummy(password: str) -> None:
    """Spend what checking a real user's password costs, for an email nobody has,
    so the time of a refusal does not tell which emails have an account."""
    try:
        hasher().verify(_dummy_hash(*_parameters()), password)
    except VerificationError:
        pass
