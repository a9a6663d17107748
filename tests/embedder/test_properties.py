"""Property tests (hypothesis): any unicode, any word lists -> no crash, offsets inside
the sequence, one vector per word, no NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedder import PretrainedTransformerEmbedder
from embedder.indexer import PretrainedTransformerIndexer
from embedder.folding import unfold_index
from embedder.inference import encode_folded
from embedder.word_pooling import pool_spans

SPECIAL = ["\u200b", "\u200d", "\u0301", "\u202e", "\u0000", "\t", "\n", "\u3000", "\U0001f600", "\ufeff",
           "\u05d0\u05d1", "x" * 300, "   "]
TEXT = st.text(st.characters(codec="utf-8"), max_size=200) | st.sampled_from(SPECIAL) | st.lists(
    st.sampled_from(SPECIAL + ["word", "über", "日本語"]), max_size=30).map("".join)
WORDS = st.lists(TEXT, min_size=1, max_size=20)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def indexer(tiny_bert_path):
    return PretrainedTransformerIndexer(tiny_bert_path, max_length=16)


@pytest.fixture(scope="module")
def embedder(tiny_bert_path):
    return PretrainedTransformerEmbedder(tiny_bert_path, max_length=16, train_parameters=False)


@SETTINGS
@given(words=st.lists(WORDS, min_size=1, max_size=4))
def test_word_offsets_stay_inside_and_every_word_gets_a_vector(indexer, embedder, words):
    batch = indexer.fold(words=words)
    for index, input_words in enumerate(words):
        offsets = batch.input_offsets(index)
        assert len(offsets) == len(input_words)
        length = int(batch.num_wordpieces[index])
        for start, end in offsets.tolist():
            assert (start, end) == (-1, -1) or 0 <= start <= end < length
    vectors = encode_folded(embedder, batch, level="word")
    assert [v.shape[0] for v in vectors] == [len(w) for w in words]
    assert all(np.isfinite(v).all() for v in vectors)


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_any_text_tokenizes_and_pools_finitely(indexer, embedder, texts):
    batch = indexer.fold(texts)
    assert batch.num_inputs == len(texts)
    assert int(batch.segment_lengths.max()) <= 16
    # unfolding gives back exactly what the tokenizer itself makes of each text, specials included
    unfolded = np.split(batch.token_ids[unfold_index(batch)], np.cumsum(batch.num_wordpieces)[:-1])
    expected = indexer.tokenizer(texts, verbose=False)["input_ids"]
    assert [ids.tolist() for ids in unfolded] == expected
    pooled = encode_folded(embedder, batch)
    assert pooled.shape == (len(texts), embedder.get_output_dim()) and np.isfinite(pooled).all()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), length=st.integers(1, 12), words=st.integers(1, 8),
       mode=st.sampled_from(["avg", "first", "last"]))
def test_pool_spans_one_finite_vector_per_span(data, length, words, mode):
    spans = []
    for _ in range(words):
        if data.draw(st.booleans()):
            spans.append((-1, -1))
        else:
            start = data.draw(st.integers(0, length - 1))
            spans.append((start, data.draw(st.integers(start, length - 1))))
    embeddings = torch.randn(1, length, 4)
    pooled = pool_spans(embeddings, torch.tensor([spans]), mode)
    assert pooled.shape == (1, words, 4) and torch.isfinite(pooled).all()
    for index, (start, end) in enumerate(spans):
        if start == -1:
            assert torch.equal(pooled[0, index], torch.zeros(4))
        elif mode == "avg":
            torch.testing.assert_close(pooled[0, index], embeddings[0, start:end + 1].mean(0))
