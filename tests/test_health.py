"""`GET /healthz` names what is down."""
from __future__ import annotations

from redis import Redis

from tests.services import free_port


def test_healthz_is_ok_when_database_and_redis_answer(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"database": "ok", "redis": "ok"}


def test_healthz_is_503_naming_redis_when_it_is_down(app, client):
    working = app.extensions["redis"]
    app.extensions["redis"] = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        response = client.get("/healthz")
    finally:
        app.extensions["redis"] = working
    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] == "ok"
    assert body["redis"].startswith("down")


def test_healthz_is_503_naming_the_database_when_it_is_down(redis_url, tmp_path):
    from config import TestConfig
    from portal import create_app

    class Unreachable(TestConfig):
        SQLALCHEMY_DATABASE_URI = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1"
        REDIS_URL = redis_url

    response = create_app(Unreachable).test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["database"].startswith("down")
    assert response.get_json()["redis"] == "ok"
