"""Every kind of bad input gets a precise status and JSON message, and loses nothing else."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

LONG = "word " * 3000  # about 3,000 wordpieces

BAD_REQUESTS = [
    # (route, body, status, words the message must contain)
    ("/embed", {"inputs": [""]}, 400, "input[0] is empty"),
    ("/embed", {"inputs": ["fine", "   "]}, 400, "input[1] is empty or whitespace"),
    ("/embed", {"inputs": []}, 400, "empty list"),
    ("/embed", {"inputs": [1, 2]}, 422, "valid string"),
    ("/embed", {"inputs": "x", "pooling": "median"}, 422, "pooling"),
    ("/embed", {"inputs": "x", "unexpected": 1}, 422, "unexpected"),
    ("/embed", {}, 422, "exactly one of 'inputs' or 'pairs'"),
    ("/embed", {"inputs": ["x"], "model": "no-such-model"}, 404, "no model named 'no-such-model'"),
    ("/embed", {"inputs": ["x"] * 101}, 413, "101 inputs"),
    ("/embed", {"inputs": ["a" * 50_001]}, 413, "50001 characters"),
    ("/embed", {"inputs": [LONG] * 7}, 413, "wordpieces, over the limit max_wordpieces_per_request=20000"),
    ("/embed", {"inputs": "x", "dimensions": True}, 422, "dimensions"),
    ("/embed", {"inputs": "x", "truncate": "yes"}, 422, "truncate"),
    ("/embed", {"pairs": [["first", "second"]], "model": "tiny-roberta"}, 400, "type ids too large"),
    ("/embed", {"inputs": ["x"], "dimensions": 1000}, 400, "dimensions=1000"),
    ("/embed_tokens", {"inputs": ["x"], "level": "word"}, 422, "needs pre-split 'words'"),
    ("/embed_tokens", {"words": [[]]}, 400, "words[0] must be a non-empty list"),
    ("/embed_tokens", {"words": [["ok", 3]]}, 422, "valid string"),
    ("/tokenize", {"inputs": ["x"], "words": [["x"]]}, 422, "exactly one of 'inputs' or 'words'"),
    ("/v1/embeddings", {"input": [[101, 2, 30522]]}, 400, "outside the model's vocabulary (0 to 30521)"),
    ("/v1/embeddings", {"input": [[101, -1]]}, 422, "input"),
    ("/v1/embeddings", {"input": [[101], []]}, 400, "non-empty list of integers"),
    ("/v1/embeddings", {"input": [[101, True]]}, 422, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 422, "encoding_format"),
    ("/v1/embeddings", {"model": "all-MiniLM-L6-v2"}, 422, "input"),
]


@pytest.mark.parametrize("route, body, status, message", BAD_REQUESTS,
                         ids=[f"{r}-{s}-{m[:24]}" for r, _, s, m in BAD_REQUESTS])
def test_bad_request(http, route, body, status, message):
    response = http.post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["code"] == status
    assert "Traceback" not in response.text


def test_malformed_json_and_unknown_route(http):
    response = http.post("/embed", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"] == "malformed JSON body"
    response = http.get("/no/such/route")
    assert response.status_code == 404 and "error" in response.json()
    assert http.get("/embed").status_code == 405


def test_bad_requests_do_not_disturb_requests_in_flight(http, client):
    texts = [f"a valid request with some words, number {i}" for i in range(40)] + [LONG[:8000]]
    expected = np.array(http.post("/embed", json={"inputs": texts}).json())
    with ThreadPoolExecutor(max_workers=8) as pool:
        valid = [pool.submit(http.post, "/embed", json={"inputs": texts}) for _ in range(4)]
        bad = [pool.submit(http.post, route, json=body) for route, body, _, _ in BAD_REQUESTS]
        statuses = [f.result().status_code for f in bad]
        answers = [f.result() for f in valid]
    assert statuses == [status for _, _, status, _ in BAD_REQUESTS]
    for answer in answers:
        assert answer.status_code == 200
        np.testing.assert_allclose(np.array(answer.json()), expected, atol=1e-5)
    assert http.get("/health").status_code == 200
    np.testing.assert_allclose(client.embed(texts), expected, atol=1e-5)
