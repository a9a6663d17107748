"""The weight cache and override weight files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertModel

from embedder import PretrainedTransformerEmbedder, cache_info, clear_cache, get_model, get_tokenizer


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def other_weights(tmp_path, tiny_bert_path):
    """A state dict of another random init of the tiny BERT, under a 'bert.' prefix."""
    torch.manual_seed(123)
    model = BertModel(BertModel.from_pretrained(tiny_bert_path).config)
    return {f"bert.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}


def test_one_load_per_spec(tiny_bert_path):
    first = get_model(tiny_bert_path)
    second = get_model(tiny_bert_path)
    assert first is second
    assert cache_info().model_loads == 1 and cache_info().model_hits == 1
    embedders = [PretrainedTransformerEmbedder(tiny_bert_path, train_parameters=False) for _ in range(3)]
    assert all(e.transformer_model is first for e in embedders)
    assert cache_info().model_loads == 1
    assert get_tokenizer(tiny_bert_path) is get_tokenizer(tiny_bert_path)
    assert cache_info().tokenizer_loads == 1


def test_dtype_and_kwargs_are_part_of_the_key(tiny_bert_path):
    fp32 = get_model(tiny_bert_path)
    bf16 = get_model(tiny_bert_path, dtype="bfloat16")
    assert bf16 is not fp32 and bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert get_model(tiny_bert_path, dtype=torch.bfloat16) is bf16
    eager = get_model(tiny_bert_path, attn_implementation="eager")
    assert eager is not fp32
    assert cache_info().model_loads == 3


def test_trainable_embedder_gets_its_own_copy(tiny_bert_path):
    shared = get_model(tiny_bert_path)
    trainable = PretrainedTransformerEmbedder(tiny_bert_path, train_parameters=True)
    assert trainable.transformer_model is not shared
    for (name, a), (_, b) in zip(shared.named_parameters(), trainable.transformer_model.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    with torch.no_grad():
        next(trainable.transformer_model.parameters()).add_(1.0)
    assert not torch.equal(next(shared.parameters()), next(trainable.transformer_model.parameters()))
    assert get_model(tiny_bert_path, make_copy=True) is not shared


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_override_weights_with_strip_prefix(tmp_path, tiny_bert_path, other_weights, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(other_weights, str(path))
    else:
        torch.save(other_weights, path)
    model = get_model(tiny_bert_path, override_weights_file=path, override_weights_strip_prefix="bert.")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, other_weights[f"bert.{name}"])
    assert not torch.equal(model.embeddings.word_embeddings.weight,
                           get_model(tiny_bert_path).embeddings.word_embeddings.weight)
    embedder = PretrainedTransformerEmbedder(tiny_bert_path, override_weights_file=str(path),
                                             override_weights_strip_prefix="bert.", train_parameters=False)
    assert embedder.transformer_model is model


def test_separate_entries_for_different_override_files(tmp_path, tiny_bert_path, other_weights):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(other_weights, str(first))
    save_file({k: v + 1 for k, v in other_weights.items()}, str(second))
    a = get_model(tiny_bert_path, override_weights_file=first, override_weights_strip_prefix="bert.")
    b = get_model(tiny_bert_path, override_weights_file=second, override_weights_strip_prefix="bert.")
    assert a is not b
    assert not torch.equal(a.pooler.dense.weight, b.pooler.dense.weight)
    assert cache_info().model_loads == 2


def test_override_weights_without_matching_keys(tmp_path, tiny_bert_path, other_weights):
    path = tmp_path / "weights.safetensors"
    save_file(other_weights, str(path))
    with pytest.raises(ValueError, match="no tensors will be loaded"):
        get_model(tiny_bert_path, override_weights_file=path, override_weights_strip_prefix="roberta.")
    with pytest.raises(ValueError, match="matches a parameter"):
        get_model(tiny_bert_path, override_weights_file=path)  # keys still carry 'bert.'


def test_torch_files_are_loaded_weights_only(tmp_path, tiny_bert_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"bert.x": Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        get_model(tiny_bert_path, override_weights_file=path, override_weights_strip_prefix="bert.")
