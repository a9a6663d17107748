"""The weight cache and override weight files: one load per spec and files, float32 unless asked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertModel

from embedder import PretrainedTransformerEmbedder, cache_info, clear_cache, get_model, get_tokenizer
from embedder.bert_embedder import PretrainedBertEmbedder, PretrainedBertModel
from embedder.cache import ModelSpec, cached_model
from embedder.mismatched_embedder import PretrainedTransformerMismatchedEmbedder
from embedder.transformer_embedder import transformer_spec


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


TEXTS = ["a half precision checkpoint", "loads in full precision, as AllenNLP loads it"]


def _plain_float32(folder: str) -> BertModel:
    """The reference: plain transformers, asked for float32."""
    return BertModel.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(folder: str) -> dict[str, torch.Tensor]:
    return AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")


def _assert_float32(model: torch.nn.Module) -> None:
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_half_precision_checkpoint_loads_in_float32_through_every_entry_point(fp16_bert):
    assert BertModel.from_pretrained(fp16_bert).dtype == torch.float16  # what transformers keeps by itself
    batch = _ids(fp16_bert)
    with torch.no_grad():
        expected = _plain_float32(fp16_bert)(**batch).last_hidden_state
        models = {
            "get_model": get_model(fp16_bert),
            "get_model copy": get_model(fp16_bert, make_copy=True),
            "cached_model": cached_model(ModelSpec.create(fp16_bert)),
            "PretrainedBertModel.load": PretrainedBertModel.load(fp16_bert),
            "PretrainedBertModel.load uncached": PretrainedBertModel.load(fp16_bert, cache_model=False),
        }
        for name, model in models.items():
            _assert_float32(model)
            torch.testing.assert_close(model(**batch).last_hidden_state, expected, rtol=1e-5, atol=1e-5,
                                       msg=name)
        mask = batch["attention_mask"].bool()
        for train_parameters in (False, True):
            embedder = PretrainedTransformerEmbedder(fp16_bert, train_parameters=train_parameters).eval()
            _assert_float32(embedder.transformer_model)
            torch.testing.assert_close(embedder(batch["input_ids"], mask)[mask], expected[mask],
                                       rtol=1e-5, atol=1e-5)
        # one word per wordpiece: the word vectors are the wordpiece vectors
        positions = torch.arange(batch["input_ids"].size(1))
        offsets = torch.stack([positions, positions], dim=-1).expand(len(TEXTS), -1, -1)
        mismatched = PretrainedTransformerMismatchedEmbedder(fp16_bert, train_parameters=False)
        _assert_float32(mismatched._matched_embedder.transformer_model)
        words = mismatched(batch["input_ids"], mask, offsets, mask)
        torch.testing.assert_close(words[mask], expected[mask], rtol=1e-5, atol=1e-5)
        bert = PretrainedBertEmbedder(fp16_bert, top_layer_only=True)
        _assert_float32(bert.bert_model)
        one = _ids(fp16_bert)["input_ids"][:1]  # no padding: the BertEmbedder masks id 0 only
        torch.testing.assert_close(bert(one)[0], expected[0, : one.size(1)], rtol=1e-5, atol=1e-5)


def test_a_dtype_asked_for_still_wins(fp16_bert):
    assert get_model(fp16_bert, dtype="float16").dtype == torch.float16
    assert get_model(fp16_bert, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert get_model(fp16_bert, dtype=torch.bfloat16) is get_model(fp16_bert, torch_dtype="bf16")
    assert get_model(fp16_bert) is get_model(fp16_bert, dtype="float32")  # the default is float32, one entry
    for kwargs in ({"dtype": torch.float16}, {"torch_dtype": "float16"}):
        embedder = PretrainedTransformerEmbedder(fp16_bert, train_parameters=False, transformer_kwargs=kwargs)
        assert embedder.dtype == torch.float16
    assert transformer_spec(fp16_bert, {"dtype": torch.bfloat16}).dtype == "bfloat16"


def test_override_weights_fill_a_half_precision_config_in_float32(tmp_path, fp16_bert, other_weights):
    path = tmp_path / "weights.safetensors"
    save_file(other_weights, str(path))
    model = get_model(fp16_bert, override_weights_file=path, override_weights_strip_prefix="bert.")
    _assert_float32(model)
    for name, value in model.state_dict().items():  # exactly the file's float32 values, never rounded to fp16
        assert torch.equal(value, other_weights[f"bert.{name}"]), name
    half = get_model(fp16_bert, override_weights_file=path, override_weights_strip_prefix="bert.", dtype="float16")
    assert half.dtype == torch.float16


def _retrain(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    BertModel(BertModel.from_pretrained(folder).config).eval().save_pretrained(folder)


def test_weights_retrained_into_the_same_folder_are_loaded_again(tmp_path, tiny_bert_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_path, folder)
    batch = _ids(str(folder))
    first = get_model(folder)
    assert get_model(folder) is first  # unchanged files: the one shared model
    assert PretrainedTransformerEmbedder(str(folder), train_parameters=False).transformer_model is first
    assert cache_info().model_loads == 1
    _retrain(folder, seed=7)
    second = get_model(folder)
    assert second is not first
    with torch.no_grad():
        expected = _plain_float32(str(folder))(**batch).last_hidden_state
        torch.testing.assert_close(second(**batch).last_hidden_state, expected)
        assert not torch.allclose(first(**batch).last_hidden_state, expected)
    assert get_model(folder) is second
    assert PretrainedTransformerEmbedder(str(folder), train_parameters=False).transformer_model is second
    assert cache_info().model_loads == 2


def test_an_override_file_rewritten_in_place_is_loaded_again(tmp_path, tiny_bert_path, other_weights):
    path = tmp_path / "weights.safetensors"
    save_file(other_weights, str(path))
    first = get_model(tiny_bert_path, override_weights_file=path, override_weights_strip_prefix="bert.")
    assert get_model(tiny_bert_path, override_weights_file=path, override_weights_strip_prefix="bert.") is first
    retrained = {k: v * 2 for k, v in other_weights.items()}
    save_file(retrained, str(path))
    second = get_model(tiny_bert_path, override_weights_file=path, override_weights_strip_prefix="bert.")
    assert second is not first
    for name, value in second.state_dict().items():
        assert torch.equal(value, retrained[f"bert.{name}"]), name
