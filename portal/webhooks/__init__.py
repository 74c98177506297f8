"""Stripe's webhooks: verify, store, acknowledge; processing happens in a job."""
from portal.webhooks.routes import bp

__all__ = ["bp"]
