"""The billing portal: `create_app(config)` builds the Flask application."""
from __future__ import annotations

from flask import Flask

from portal.converters import register as register_converters
from portal.extensions import csrf, db, login_manager, migrate
from portal.security import init_security


def create_app(config: object | None = None) -> Flask:
    """Build an app from a config object (default: `config.Config`, read from the env)."""
    app = Flask(
        __name__,
        static_folder="../static",
        template_folder="../templates",
        instance_relative_config=False,
    )
    if config is None:
        from config import Config

        config = Config
    app.config.from_object(config)
    if not app.config.get("SECRET_KEY"):
        raise RuntimeError("SECRET_KEY is not set: export SECRET_KEY (the run command sets one for you)")

    db.init_app(app)
    migrate.init_app(app, db, directory=str(_migrations_dir()), render_as_batch=True, compare_type=True)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    csrf.init_app(app)
    init_security(app)

    from portal import models  # noqa: F401  (register the models with the metadata)
    from portal.database import configure_engine
    from portal.queue import init_redis

    with app.app_context():
        configure_engine(db.engine)
    init_redis(app)

    register_converters(app)  # <dbint:...>, <slug:...>, <jobid:...> for the routes below
    from portal.errors import init_error_pages

    init_error_pages(app)  # before the blueprints: the API's 404/405 handler wraps these
    from portal.admin import bp as admin_bp
    from portal.api import bp as api_bp
    from portal.auth import bp as auth_bp
    from portal.customer import bp as customer_bp
    from portal.health import bp as health_bp
    from portal.metrics import bp as metrics_bp
    from portal.metrics import init_metrics
    from portal.webhooks import bp as webhooks_bp

    app.register_blueprint(auth_bp)
    app.register_blueprint(customer_bp)
    app.register_blueprint(admin_bp, url_prefix="/admin")
    from portal.admin.jobs_dashboard import register_jobs_dashboard

    register_jobs_dashboard(app)
    app.register_blueprint(api_bp, url_prefix="/api/v1")
    app.register_blueprint(health_bp)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(metrics_bp)
    init_metrics(app)
    csrf.exempt(api_bp)
    csrf.exempt(webhooks_bp)
    csrf.exempt(health_bp)

    from portal.cli import register_commands
    from portal.templating import register_filters

    register_commands(app)
    register_filters(app)
    return app


def _migrations_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "migrations"
