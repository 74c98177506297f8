"""The customer's billing pages."""
from portal.customer import (  # noqa: F401  (routes registered on bp)
    alerts,
    export,
    live,  # noqa: F401  (its routes join the blueprint)
    services,
)
from portal.customer.routes import bp
from portal.customer.stripe_status import register as _register_stripe_status

bp.record_once(lambda state: _register_stripe_status(state.app))

__all__ = ["bp"]
