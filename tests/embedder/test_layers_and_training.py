"""ScalarMix, train/eval behaviour, gradients and gradient checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from embedder import PretrainedTransformerEmbedder, PretrainedTransformerIndexer, ScalarMix, encode_folded

TEXTS = ["the cat sat on the mat", "a second, somewhat longer sentence about dogs"]


def test_all_layers_with_uniform_weights_is_mean_of_hidden_layers(tiny_bert_path):
    embedder = PretrainedTransformerEmbedder(tiny_bert_path, last_layer_only=False, train_parameters=False)
    model = AutoModel.from_pretrained(tiny_bert_path).eval()
    encoded = AutoTokenizer.from_pretrained(tiny_bert_path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded, output_hidden_states=True).hidden_states[1:]
        output = embedder(**PretrainedTransformerIndexer(tiny_bert_path)(TEXTS))
    expected = torch.stack(hidden).mean(0)
    mask = encoded["attention_mask"].bool()
    torch.testing.assert_close(output[mask], expected[mask], atol=1e-5, rtol=1e-4)


def test_scalar_mix_through_encode_folded_on_a_folded_input(tiny_bert_path):
    """The serving path (ragged, folded, sub-batched) against the plain model's hidden layers."""
    from references import reference_folded_output

    embedder = PretrainedTransformerEmbedder(tiny_bert_path, max_length=16, last_layer_only=False,
                                             train_parameters=False)
    indexer = PretrainedTransformerIndexer(tiny_bert_path, max_length=16)
    long_text = " ".join(TEXTS * 4)
    vectors = encode_folded(embedder, indexer.fold([long_text, TEXTS[0]]), level="wordpiece", max_batch_tokens=40)
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bert_path), AutoModel.from_pretrained(tiny_bert_path)
    model.eval()
    pieces = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    layers = [reference_folded_output(lambda **kw: (model(**kw, output_hidden_states=True).hidden_states[i],),
                                      pieces, [tokenizer.cls_token_id], [tokenizer.sep_token_id], 16)
              for i in range(1, model.config.num_hidden_layers + 1)]
    torch.testing.assert_close(torch.from_numpy(vectors[0]), torch.stack(layers).mean(0), atol=1e-5, rtol=1e-4)


def test_scalar_mix_weights_and_gamma():
    tensors = [torch.full((2, 3, 4), float(value)) for value in (1.0, 2.0, 3.0)]
    mix = ScalarMix(3, initial_scalar_parameters=[0.0, np.log(2.0), np.log(5.0)])
    weights = np.array([1.0, 2.0, 5.0]) / 8.0
    torch.testing.assert_close(mix(tensors), torch.full((2, 3, 4), float(weights @ [1, 2, 3])))
    with pytest.raises(ValueError):
        ScalarMix(2, initial_scalar_parameters=[1.0])
    with pytest.raises(ValueError):
        mix(tensors[:2])


def test_untrainable_scalar_mix_keeps_its_values():
    mix = ScalarMix(2, initial_scalar_parameters=[0.1, 0.9], trainable=False)
    assert not any(p.requires_grad for p in mix.parameters())
    tensors = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    mix(tensors).sum().backward()
    assert [float(p.detach()) for p in mix.scalar_parameters] == pytest.approx([0.1, 0.9])
    trainable = ScalarMix(2)
    optimizer = torch.optim.SGD(trainable.parameters(), lr=1.0)
    (trainable([torch.ones(1, 2, 3), 2 * torch.ones(1, 2, 3)]).sum()).backward()
    optimizer.step()
    assert float(trainable.scalar_parameters[1].detach()) < 0.0  # moved toward the smaller layer


def test_scalar_mix_masked_layer_norm():
    torch.manual_seed(0)
    tensors = [torch.randn(2, 5, 4) * (k + 1) + k for k in range(3)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    output = ScalarMix(3, do_layer_norm=True)(tensors, mask)
    keep = mask.bool().numpy()
    expected = np.zeros((2, 5, 4))
    for tensor in tensors:
        values = tensor.numpy()
        real = values[keep]
        expected += (values - real.mean()) / np.sqrt(real.var() + 1e-13) / 3
    np.testing.assert_allclose(output.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    # padded positions do not move the statistics
    changed = [t.clone() for t in tensors]
    for t in changed:
        t[0, 3:] = 1000.0
    np.testing.assert_allclose(ScalarMix(3, do_layer_norm=True)(changed, mask).detach().numpy()[keep],
                               expected[keep], rtol=1e-4, atol=1e-5)


def test_frozen_transformer_stays_in_eval_mode(tiny_bert_path):
    embedder = PretrainedTransformerEmbedder(tiny_bert_path, train_parameters=False, last_layer_only=False)
    parent = torch.nn.Sequential(embedder)
    parent.train()
    assert embedder.training and embedder._scalar_mix.training
    assert not embedder.transformer_model.training
    assert not any(m.training for m in embedder.transformer_model.modules())
    indexed = PretrainedTransformerIndexer(tiny_bert_path)(TEXTS)
    first, second = embedder(**indexed), embedder(**indexed)
    torch.testing.assert_close(first, second)  # no dropout
    assert not any(p.requires_grad for p in embedder.transformer_model.parameters())
    assert all(p.requires_grad for p in embedder._scalar_mix.parameters())


def test_trainable_transformer_gets_gradients_and_dropout(tiny_bert_path):
    embedder = PretrainedTransformerEmbedder(tiny_bert_path, train_parameters=True)
    embedder.train()
    assert embedder.transformer_model.training
    indexed = PretrainedTransformerIndexer(tiny_bert_path)(TEXTS)
    torch.manual_seed(0)
    output = embedder(**indexed)
    assert output.requires_grad
    output.sum().backward()
    grads = [p.grad for p in embedder.transformer_model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:5])
    assert not torch.allclose(output, embedder(**indexed))  # dropout is on


def test_gradient_checkpointing_runs_backward(tiny_bert_path):
    embedder = PretrainedTransformerEmbedder(tiny_bert_path, gradient_checkpointing=True, max_length=8)
    embedder.train()
    assert embedder.transformer_model.is_activation_checkpointing
    indexed = PretrainedTransformerIndexer(tiny_bert_path, max_length=8)(TEXTS)
    embedder(**indexed).pow(2).mean().backward()
    layer_weight = embedder.transformer_model.encoder.layer[0].attention.self.query.weight
    assert layer_weight.grad is not None and torch.isfinite(layer_weight.grad).all()
    assert layer_weight.grad.abs().sum() > 0
