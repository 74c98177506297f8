"""The JSON API for the platform's sub-systems (bearer tokens)."""
from portal.api.routes import bp

__all__ = ["bp"]
