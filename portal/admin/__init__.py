"""The support staff's view over every organization."""
from portal.admin.routes import bp

__all__ = ["bp"]
