"""Word-level embeddings: the mismatched embedder and BertEmbedder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from embedder import (
    BertEmbedder,
    PretrainedBertEmbedder,
    PretrainedBertModel,
    PretrainedTransformerIndexer,
    PretrainedTransformerMismatchedEmbedder,
    get_model,
)

WORDS = [["AllenNLP", "is", "great"], ["Definitely", "", "not"]]


def test_offsets_on_a_known_sentence(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    assert tokenizer.tokenize("AllenNLP is great") == ["allen", "##nl", "##p", "is", "great"]
    indexed = PretrainedTransformerIndexer(minilm_path)(words=WORDS)
    assert indexed["offsets"][0].tolist() == [[1, 3], [4, 4], [5, 5]]
    assert indexed["offsets"][1].tolist() == [[1, 1], [-1, -1], [2, 2]]
    assert indexed["mask"].tolist() == [[True] * 3, [True] * 3]
    assert indexed["wordpiece_mask"].sum(-1).tolist() == [7, 4]


@pytest.mark.parametrize("mode", ["avg", "first", "last"])
def test_word_vectors_pool_the_reference_wordpieces(minilm_path, mode):
    embedder = PretrainedTransformerMismatchedEmbedder(minilm_path, sub_token_mode=mode, train_parameters=False)
    indexed = PretrainedTransformerIndexer(minilm_path)(words=WORDS)
    reference_model = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        output = embedder(**indexed)
        pieces = reference_model(input_ids=indexed["token_ids"][:1])[0][0]
    assert output.shape == (2, 3, 384)
    span = pieces[1:4]
    expected = {"avg": span.mean(0), "first": span[0], "last": span[-1]}[mode]
    torch.testing.assert_close(output[0, 0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output[0, 1], pieces[4], atol=1e-5, rtol=1e-4)
    assert torch.all(output[1, 1] == 0)


@pytest.mark.parametrize("mode", ["avg", "first", "last"])
def test_empty_word_gives_zeros_and_finite_gradients(tiny_bert_path, mode):
    embedder = PretrainedTransformerMismatchedEmbedder(tiny_bert_path, sub_token_mode=mode, max_length=6)
    indexed = PretrainedTransformerIndexer(tiny_bert_path, max_length=6)(
        words=[["", "hello", "", "a", "much", "longer", "list", "of", "words", ""]])
    output = embedder(**indexed)
    assert torch.all(output[0, [0, 2, 9]] == 0)
    assert torch.isfinite(output).all()
    output.sum().backward()
    for parameter in embedder.parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all()


def test_unknown_sub_token_mode(tiny_bert_path):
    with pytest.raises(ValueError, match="sub_token_mode"):
        PretrainedTransformerMismatchedEmbedder(tiny_bert_path, sub_token_mode="median")


def test_bert_embedder_windows_equal_the_plain_model_per_window(tiny_bert_path):
    embedder = BertEmbedder(PretrainedBertModel.load(tiny_bert_path), max_pieces=8, top_layer_only=True)
    torch.manual_seed(0)
    short = torch.randint(1000, 2000, (2, 6))
    plain = AutoModel.from_pretrained(tiny_bert_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(embedder(short), plain(input_ids=short).last_hidden_state)
        long_ids = torch.randint(1000, 2000, (2, 20))
        output = embedder(long_ids)
        # AllenNLP 0.9 on 20 wordpieces in windows of 8 (1 start, 1 end token): stride 3, the first two
        # positions, the middle three of each window, and nothing of the short last window past its middle
        keep = [0, 1, 2, 3, 4, 10, 11, 12, 18, 19]
        windows = [F.pad(w, [0, 8 - w.size(1)]) for w in long_ids.split(8, dim=1)]
        per_window = torch.cat([plain(input_ids=w, attention_mask=(w != 0).long()).last_hidden_state
                                for w in windows], dim=1)
        torch.testing.assert_close(output, per_window[:, keep])
        offsets = torch.tensor([[0, 2, 4, 6, 9], [1, 3, 5, 7, 8]])
        picked = embedder(long_ids, offsets=offsets)
        torch.testing.assert_close(picked, torch.stack([output[0, offsets[0]], output[1, offsets[1]]]))
        nested = embedder(long_ids.view(1, 2, 20), offsets=offsets.view(1, 2, 5))
        torch.testing.assert_close(nested[0], picked)


def test_bert_embedder_top_layer_and_fixed_mix(tiny_bert_path):
    model = PretrainedBertModel.load(tiny_bert_path)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        layers = AutoModel.from_pretrained(tiny_bert_path).eval()(input_ids=ids, output_hidden_states=True).hidden_states
        top = BertEmbedder(model, top_layer_only=True)(ids)
        mixed = BertEmbedder(model, scalar_mix_parameters=[0.0, 100.0])(ids)
    torch.testing.assert_close(top, layers[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed, layers[2], atol=1e-5, rtol=1e-4)
    fixed = BertEmbedder(model, scalar_mix_parameters=[0.0, 1.0])
    assert not any(p.requires_grad for p in fixed._scalar_mix.parameters())
    assert all(p.requires_grad for p in BertEmbedder(model)._scalar_mix.parameters())


def test_pretrained_bert_embedder_requires_grad(tiny_bert_path):
    frozen = PretrainedBertEmbedder(tiny_bert_path, requires_grad=False)
    assert frozen.bert_model is get_model(tiny_bert_path)
    assert not any(p.requires_grad for p in frozen.bert_model.parameters())
    frozen.train()
    assert not frozen.bert_model.training
    tuned = PretrainedBertEmbedder(tiny_bert_path, requires_grad=True, top_layer_only=True)
    assert tuned.bert_model is not frozen.bert_model
    assert all(p.requires_grad for p in tuned.bert_model.parameters())
    tuned(torch.tensor([[101, 7592, 102]])).sum().backward()
    assert tuned.bert_model.embeddings.word_embeddings.weight.grad is not None
    assert not any(p.requires_grad for p in frozen.bert_model.parameters())
