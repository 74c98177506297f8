"""The JSON API for the platform's sub-systems (bearer tokens)."""
from portal.api import docs, jobs  # noqa: F401  (register the docs, sync and job routes on bp)
from portal.api.routes import bp

__all__ = ["bp"]
