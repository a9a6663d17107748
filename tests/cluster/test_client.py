"""The Python handle client: same answers as HTTP, numpy out, clear exceptions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cluster import BadRequestError, PayloadTooLargeError, UnknownModelError

TEXTS = ["the handle path skips HTTP and JSON", "numpy arrays come back directly"]


def test_embed_matches_http(client, http):
    vectors = client.embed(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    np.testing.assert_allclose(vectors, np.array(http.post("/embed", json={"inputs": TEXTS}).json()), atol=1e-6)
    assert client.embed("one text").shape == (1, 384)
    assert client.embed(TEXTS, model="tiny-bert", pooling="max", normalize=True).shape == (2, 32)


def test_embed_tokens_and_tokenize(client):
    pieces = client.embed_tokens(["AllenNLP is great"])
    assert len(pieces) == 1 and pieces[0].shape == (7, 384)
    tokenized = client.tokenize(words=[["AllenNLP", "rocks"]])
    assert tokenized[0]["word_offsets"] == [(1, 3), (4, 4)]
    assert [m["id"] for m in client.models()][0] == "all-MiniLM-L6-v2"


def test_async_twins(client, cluster_config):
    async def run():
        return await asyncio.gather(client.aembed(TEXTS), client.aembed_tokens(words=[["a", "b"]], level="word"),
                                    client.atokenize(TEXTS), client.amodels())

    vectors, words, tokens, models = asyncio.run(run())
    np.testing.assert_allclose(vectors, client.embed(TEXTS), atol=1e-6)
    assert words[0].shape == (2, 384) and len(tokens) == 2 and len(models) == len(cluster_config.models)


def test_errors_name_the_problem(client):
    with pytest.raises(UnknownModelError, match="no model named 'gpt'"):
        client.embed(TEXTS, model="gpt")
    with pytest.raises(BadRequestError, match="input\\[1\\] is empty"):
        client.embed(["ok", ""])
    with pytest.raises(BadRequestError, match="valid string"):
        client.embed([b"bytes"])
    with pytest.raises(PayloadTooLargeError, match="101 inputs"):
        client.embed(["x"] * 101)
    with pytest.raises(BadRequestError, match="type ids too large"):
        client.embed(pairs=[("a", "b")], model="tiny-roberta")
    assert client.embed(TEXTS).shape == (2, 384)


@pytest.mark.parametrize("arguments, field", [
    ({"dimensions": -5}, "dimensions"), ({"dimensions": 0}, "dimensions"), ({"dimensions": True}, "dimensions"),
    ({"dimensions": 2.5}, "dimensions"), ({"truncate": "yes"}, "truncate"), ({"normalize": 1}, "normalize"),
    ({"pooling": "median"}, "pooling"), ({"truncation_direction": "up"}, "truncation_direction"),
])
def test_handle_arguments_are_checked_as_http_checks_them(client, http, arguments, field):
    """One validation for both doors: what /embed refuses, the handle refuses, naming the field."""
    with pytest.raises(BadRequestError, match=field):
        client.embed(TEXTS, **arguments)
    response = http.post("/embed", json={"inputs": TEXTS, **arguments})
    assert response.status_code == 422 and field in response.json()["error"]["message"]
    assert client.embed(TEXTS, dimensions=8).shape == (2, 8)
