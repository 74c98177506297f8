"""The customer's billing pages."""
from portal.customer import live  # noqa: F401  (its routes join the blueprint)
from portal.customer.routes import bp

__all__ = ["bp"]
