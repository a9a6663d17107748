"""Token ids given as such are checked against the model's embedding matrix, not the tokenizer's size."""

from __future__ import annotations

import json

import pytest

from embedder.indexer import PretrainedTransformerIndexer
from embedder.sentence_encoder import resolve_sentence_settings
from st_folders import copy_minilm_tokenizer


def test_ids_past_the_embedding_matrix_are_refused(tmp_path, minilm_path):
    from transformers import BertConfig, BertModel

    # a model whose embedding matrix is smaller than its tokenizer (tokens added, the matrix not resized)
    folder = tmp_path / "small-vocabulary"
    BertModel(BertConfig(vocab_size=30_000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    copy_minilm_tokenizer(minilm_path, folder)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 30_000
    settings = resolve_sentence_settings(str(folder))
    assert settings.vocab_size == 30_000
    indexer = settings.indexer()
    assert len(indexer.tokenizer) == 30_522
    assert indexer.fold(token_ids=[[101, 29_999, 102]]).num_inputs == 1
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \(0 to 29999\)"):
        indexer.fold(token_ids=[[101, 30_100, 102]])


def test_without_a_model_the_tokenizer_decides(minilm_path):
    indexer = PretrainedTransformerIndexer(minilm_path)
    with pytest.raises(ValueError, match="0 to 30521"):
        indexer.fold(token_ids=[[101, 30_522, 102]])
