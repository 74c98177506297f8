"""The customer's billing pages."""
from portal.customer.routes import bp

__all__ = ["bp"]
