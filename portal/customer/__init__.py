"""The customer's billing pages."""
from portal.customer import alerts, export, services  # noqa: F401  (routes registered on bp)
from portal.customer.routes import bp

__all__ = ["bp"]
