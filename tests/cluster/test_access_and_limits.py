"""The API key, the body-size limit, and what error bodies may carry."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

ROUTES = [("POST", "/embed", {"inputs": ["x"]}), ("POST", "/v1/embeddings", {"input": "x"}),
          ("POST", "/embed_tokens", {"inputs": ["x"]}), ("POST", "/tokenize", {"inputs": ["x"]}),
          ("GET", "/models", None), ("GET", "/docs", None), ("GET", "/openapi.json", None)]


@pytest.mark.parametrize("method, route, body", ROUTES, ids=[r for _, r, _ in ROUTES])
def test_every_route_but_health_needs_the_key(guarded_url, api_key, method, route, body):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": api_key},
                    {"X-API-Key": api_key[:-1]}):
        response = httpx.request(method, guarded_url + route, json=body, headers=headers, timeout=30)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
    for headers in ({"Authorization": f"Bearer {api_key}"}, {"X-API-Key": api_key}):
        response = httpx.request(method, guarded_url + route, json=body, headers=headers, timeout=30)
        assert response.status_code == 200, response.text


def test_health_needs_no_key_and_a_bad_body_without_key_is_401(guarded_url):
    assert httpx.get(guarded_url + "/health").json()["status"] == "ok"
    response = httpx.post(guarded_url + "/embed", content=b"{not json", timeout=30)
    assert response.status_code == 401


def test_openai_client_api_key(guarded_url, api_key):
    good = openai.OpenAI(base_url=guarded_url + "/v1", api_key=api_key, max_retries=0)
    answer = good.embeddings.create(model="guarded-tiny", input=["hello there", "general kenobi"])
    assert len(answer.data) == 2 and len(answer.data[0].embedding) == 32
    bad = openai.OpenAI(base_url=guarded_url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="guarded-tiny", input="hello")


def test_body_over_the_limit_is_413_with_or_without_content_length(guarded_url, api_key):
    headers = {"Authorization": f"Bearer {api_key}", "content-type": "application/json"}
    body = b'{"inputs": ["' + b"a " * 40_000 + b'"]}'  # 80 kB, over the 64 KiB limit
    response = httpx.post(guarded_url + "/embed", content=body, headers=headers, timeout=30)
    assert response.status_code == 413 and "over the limit max_body_bytes=65536" in response.json()["error"]["message"]

    def chunks():  # a streamed body: no Content-Length, sent chunked
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    response = httpx.post(guarded_url + "/embed", content=chunks(), headers=headers, timeout=30)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "payload_too_large"
    small = httpx.post(guarded_url + "/embed", json={"inputs": ["a " * 100]}, headers=headers, timeout=30)
    assert small.status_code == 200 and np.array(small.json()).shape == (1, 32)


def test_default_bind_is_loopback_and_errors_carry_no_traceback(http, serve_cluster):
    from cluster.config import ClusterConfig

    assert ClusterConfig().http.host == "127.0.0.1"
    for route, body in (("/embed", {"inputs": [""]}), ("/embed", {"inputs": ["x"], "model": "nope"}),
                        ("/embed_tokens", {"words": [["a"]], "level": "word", "sub_token_mode": "x"})):
        response = http.post(route, json=body)
        assert 400 <= response.status_code < 500
        assert "Traceback" not in response.text and 'File "' not in response.text
