"""The customer's billing pages."""
from portal.customer import services  # noqa: F401,E402  (routes registered on bp)
from portal.customer.routes import bp

__all__ = ["bp"]
