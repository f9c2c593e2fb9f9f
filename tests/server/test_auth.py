"""API key: every route but /v1/health needs it (the `other_server` fixture takes it from the environment)."""

from __future__ import annotations

import base64

import pytest
from server_harness import API_KEY as KEY
from server_harness import FAST

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
def test_every_route_but_health_needs_the_key(other_server, headers):
    for method, path in ROUTES:
        response = other_server.request(method, path, headers=headers)
        assert response.status == 401, (method, path)
        assert response.error()["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert other_server.request("GET", "/v1/health", headers=headers).status == 200


def test_the_key_as_bearer_header_or_basic_password(other_server):
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"Authorization": f"Basic {basic}"}):
        assert other_server.request("GET", "/v1/models", headers=headers).status == 200
        assert other_server.request("GET", "/", headers=headers).status == 200
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "a red cat", "size": "64x64", "response_format": "url", **FAST}
    generated = other_server.request("POST", "/v1/images/generations", body, headers=headers)
    assert generated.status == 200
    path = generated.json()["data"][0]["url"].removeprefix(other_server.url)
    assert other_server.request("GET", path, headers={}).status == 401
    assert other_server.request("GET", path, headers=headers).status == 200
