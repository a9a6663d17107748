"""Weights as numpy arrays and back: bit-exact, zero-copy, complete, ties kept; the files' fingerprint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, T5EncoderModel

from embedder.cache import ModelSpec
from embedder.shared_weights import export_weights, model_from_weights
from embedder.weights import weights_fingerprint


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
    assert weights.nbytes == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert np.shares_memory(weights.arrays["pooler.dense.weight"], model.pooler.dense.weight.detach().numpy())


def test_tied_weights_are_stored_once_and_stay_tied(tiny_t5_path):
    spec = ModelSpec.create(tiny_t5_path, dtype="float32", model_class="T5EncoderModel")
    original = T5EncoderModel.from_pretrained(tiny_t5_path).eval()
    assert original.shared.weight is original.encoder.embed_tokens.weight
    weights = export_weights(spec, original)
    assert weights.aliases == {"encoder.embed_tokens.weight": "shared.weight"}
    assert "encoder.embed_tokens.weight" not in weights.arrays
    rebuilt = model_from_weights(weights)
    assert rebuilt.shared.weight is rebuilt.encoder.embed_tokens.weight
    assert rebuilt.shared.weight.data_ptr() == weights.arrays["shared.weight"].__array_interface__["data"][0]
    ids = torch.tensor([[3, 5, 7, 1]])
    assert torch.equal(_outputs(rebuilt, ids), _outputs(original, ids))


def test_fingerprint_follows_the_files(tmp_path, tiny_bert_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_path, folder)
    first = weights_fingerprint(folder)
    assert weights_fingerprint(folder) == first
    (folder / "vocab.txt").write_text("changed")  # not a weight file
    assert weights_fingerprint(folder) == first
    AutoModel.from_pretrained(folder).save_pretrained(folder)  # retrained into the same folder
    second = weights_fingerprint(folder)
    assert second != first
    override = tmp_path / "override.safetensors"
    override.write_bytes(b"x")
    assert weights_fingerprint(folder, override) not in (first, second)
