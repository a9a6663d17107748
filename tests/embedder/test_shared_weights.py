"""Weights as numpy arrays and back: bit-exact, zero-copy, and complete."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from embedder.cache import ModelSpec
from embedder.shared_weights import export_weights, model_from_weights


def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]


@pytest.mark.parametrize("path_fixture, dtype", [("minilm_path", "bfloat16"), ("minilm_path", "float32"),
                                                 ("tiny_roberta_path", "float16")])
def test_round_trip_is_bit_exact_and_shares_memory(request, path_fixture, dtype):
    path = request.getfixturevalue(path_fixture)
    spec = ModelSpec.create(path, dtype=dtype)
    original = AutoModel.from_pretrained(path, dtype=spec.torch_dtype).eval()
    weights = export_weights(spec, original)
    # what the object store hands out: read-only arrays
    for array in weights.arrays.values():
        array.flags.writeable = False
    rebuilt = model_from_weights(weights)

    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    for name, tensor in rebuilt.state_dict().items():
        assert tensor.dtype == spec.torch_dtype or not tensor.is_floating_point(), name
        assert torch.equal(tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor,
                           original.state_dict()[name].view(torch.int16) if tensor.dtype == torch.bfloat16
                           else original.state_dict()[name]), name
    word_embeddings = rebuilt.get_input_embeddings().weight
    array = weights.arrays["embeddings.word_embeddings.weight"]
    assert word_embeddings.data_ptr() == array.__array_interface__["data"][0], "the tensor copied the array"
    ids = torch.tensor([[0, 5, 17, 42, 2]])
    assert torch.equal(_outputs(rebuilt, ids), _outputs(original, ids))


def test_incomplete_weights_are_refused(minilm_path):
    spec = ModelSpec.create(minilm_path, dtype="float32")
    weights = export_weights(spec, AutoModel.from_pretrained(minilm_path))
    del weights.arrays["encoder.layer.0.attention.self.query.weight"]
    with pytest.raises(ValueError, match="lack"):
        model_from_weights(weights)


def test_export_covers_every_tensor_without_copying(tiny_bert_path):
    spec = ModelSpec.create(tiny_bert_path, dtype="float32")
    model = AutoModel.from_pretrained(tiny_bert_path)
    weights = export_weights(spec, model)
    assert set(model.state_dict()) <= set(weights.arrays)
    assert weights.nbytes == sum(a.nbytes for a in weights.arrays.values()) > 0
    assert np.shares_memory(weights.arrays["pooler.dense.weight"], model.pooler.dense.weight.detach().numpy())
