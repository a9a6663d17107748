"""Sentence pooling against sentence-transformers, and encode_folded against forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedder import (
    EncodeStats,
    PretrainedTransformerEmbedder,
    PretrainedTransformerIndexer,
    encode_folded,
    pool_sentences,
    read_sentence_folder,
)

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Embeddings turn text into vectors.",
    "Ray Serve scales Python services.",
    "x",
]
MIXED = [
    "short",
    "a sentence of medium length about nothing in particular",
    "A long document that will need folding into several segments. " * 40,
    "another short one",
    "Yet another long text, which is repeated until it spans a few segments of wordpieces. " * 25,
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_pooling_defaults_from_sentence_transformers_folder(minilm_path, tiny_bert_path):
    folder = read_sentence_folder(minilm_path)
    assert (folder.pooling_modes, folder.normalizes, folder.max_seq_length) == (("mean",), True, 256)
    plain = read_sentence_folder(tiny_bert_path)
    assert (plain.is_sentence_transformers, plain.pooling_modes, plain.normalizes) == (False, ("mean",), False)


def test_minilm_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm_path, device="cpu").encode(SENTENCES, convert_to_numpy=True)
    embedder = PretrainedTransformerEmbedder(minilm_path, max_length=512, train_parameters=False)
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=512)
    with torch.no_grad():
        indexed = indexer(SENTENCES)
        ours = pool_sentences(embedder(**indexed), indexed["mask"], "mean", normalize=True).numpy()
    assert cosine(ours, reference).min() >= 0.99999
    folded = encode_folded(embedder, indexer.fold(SENTENCES), pooling="mean", normalize=True)
    assert cosine(folded, reference).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(folded, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("level", ["wordpiece", "pooled"])
def test_encode_folded_equals_forward(minilm_path, level):
    max_length = 64
    embedder = PretrainedTransformerEmbedder(minilm_path, max_length=max_length, train_parameters=False)
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=max_length)
    with torch.no_grad():
        indexed = indexer(MIXED)
        forward = embedder(**indexed)
    batch = indexer.fold(MIXED)
    assert batch.segments_per_input.max() > 3
    stats = EncodeStats()
    encoded = encode_folded(embedder, batch, level=level, pooling="max", max_batch_tokens=256, stats=stats)
    assert stats.sub_batches > 1
    if level == "pooled":
        expected = pool_sentences(forward, indexed["mask"], "max").numpy()
        np.testing.assert_allclose(encoded, expected, atol=1e-4, rtol=1e-4)
    else:
        for row, (array, length) in enumerate(zip(encoded, indexed["mask"].sum(-1))):
            assert array.shape == (int(length), 384)
            np.testing.assert_allclose(array, forward[row, :length].numpy(), atol=1e-4, rtol=1e-4)


def test_encode_folded_on_several_batches_and_words(minilm_path):
    embedder = PretrainedTransformerEmbedder(minilm_path, max_length=16, train_parameters=False)
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=16)
    one, two = indexer.fold(MIXED[:2]), indexer.fold(MIXED[2:])
    together = encode_folded(embedder, [one, two], pooling="cls")
    assert [r.shape for r in together] == [(2, 384), (3, 384)]
    np.testing.assert_allclose(np.concatenate(together), encode_folded(embedder, indexer.fold(MIXED), pooling="cls"),
                               atol=1e-5)
    words = [["The", "", "unfolding", "keeps", "words"] * 6, ["one"]]
    word_vectors = encode_folded(embedder, indexer.fold(words=words), level="word")
    assert [w.shape for w in word_vectors] == [(30, 384), (1, 384)]
    assert np.all(word_vectors[0][1] == 0) and np.isfinite(word_vectors[0]).all()
    with pytest.raises(ValueError, match="words"):
        encode_folded(embedder, one, level="word")


def test_padding_efficiency_on_mixed_lengths(minilm_path):
    embedder = PretrainedTransformerEmbedder(minilm_path, max_length=128, train_parameters=False)
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=128)
    rng = np.random.default_rng(0)
    words = "the of and a to in is that for it as was with be by on not he this are or".split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.lognormal(3.0, 1.2, size=200).clip(1, 2000)]
    stats = EncodeStats()
    encode_folded(embedder, indexer.fold(texts), max_batch_tokens=4096, stats=stats)
    assert stats.padding_efficiency >= 0.9
