"""API key: every route but /v1/health needs it; it comes from the environment, as the docs recommend."""

from __future__ import annotations

import base64

import pytest
from conftest import FAST, Server

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server(tiny_repos):
    args = ["--prior", str(tiny_repos["prior"]), "--decoder", str(tiny_repos["decoder"]), "--max-steps", "10"]
    server = Server(args, env={"KANDINSKY22_API_KEY": KEY})
    yield server
    server.stop()


ROUTES = [
    ("GET", "/"),
    ("GET", "/static/app.js"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/v1/models"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/some-id"),
    ("DELETE", "/v1/jobs/some-id"),
    ("GET", "/v1/jobs/some-id/events"),
    ("GET", "/v1/jobs/some-id/images/0.png"),
]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}, {"Authorization": KEY}],
    ids=["none", "wrong-bearer", "wrong-header", "no-scheme"],
)
def test_every_route_but_health_needs_the_key(keyed_server, headers):
    for method, path in ROUTES:
        response = keyed_server.request(method, path, headers=headers)
        assert response.status == 401, (method, path)
        assert response.error()["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert keyed_server.request("GET", "/v1/health", headers=headers).status == 200


def test_the_key_as_bearer_header_or_basic_password(keyed_server):
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"Authorization": f"Basic {basic}"}):
        assert keyed_server.request("GET", "/v1/models", headers=headers).status == 200
        assert keyed_server.request("GET", "/", headers=headers).status == 200
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "a red cat", "size": "64x64", "response_format": "url", **FAST}
    generated = keyed_server.request("POST", "/v1/images/generations", body, headers=headers)
    assert generated.status == 200
    path = generated.json()["data"][0]["url"].removeprefix(keyed_server.url)
    assert keyed_server.request("GET", path).status == 401
    assert keyed_server.request("GET", path, headers=headers).status == 200
