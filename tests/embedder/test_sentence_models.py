"""Every sentence-transformers setup in-process (``SentenceEncoder``), against sentence-transformers itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedder import PretrainedTransformerIndexer, SentenceEncoder, UnsupportedModelError, pool_ragged
from embedder.sentence_pooling import POOLING_MODES
from st_folders import LONG_TEXTS, SETUPS, TEXTS, bert_mean, unknown_module

SETUP_NAMES = [spec.name for spec in SETUPS]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def reference(folder: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu")


@pytest.mark.parametrize("include_prompt", [True, False])
@pytest.mark.parametrize("modes", [*POOLING_MODES, ("cls", "mean"), ("max", "weightedmean", "lasttoken")])
def test_pool_ragged_equals_sentence_transformers_pooling(modes, include_prompt):
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    lengths = torch.tensor([7, 3, 5, 1])
    embeddings = torch.randn(4, 7, 8)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    module = Pooling(8, pooling_mode=modes, include_prompt=include_prompt)
    expected = module({"token_embeddings": embeddings, "attention_mask": mask, "prompt_length": 2})
    skip = None if include_prompt else torch.full((4,), 2)
    ours = pool_ragged(embeddings[mask.bool()], lengths, modes, skip=skip)
    rows = slice(None) if include_prompt else slice(0, 3)  # a sequence of only the prompt differs by design
    torch.testing.assert_close(ours[rows], expected["sentence_embedding"][rows])


@pytest.mark.parametrize("name", SETUP_NAMES)
def test_sentence_encoder_equals_sentence_transformers(st_folders, name):
    folder = st_folders[name]
    expected_model = reference(folder)
    ours = SentenceEncoder(folder, device="cpu")
    assert ours.get_output_dim() == expected_model.get_embedding_dimension()
    assert ours.settings.max_length == expected_model.max_seq_length
    assert ours.indexer.fold(TEXTS, prompt=max(ours.settings.prompts.values(), key=len)).segments_per_input.max() == 1
    assert cosine(ours.encode(TEXTS), expected_model.encode(TEXTS)).min() >= 0.9999
    plain = expected_model.encode(TEXTS, prompt="")
    for prompt_name, prompt in ours.settings.prompts.items():
        expected = expected_model.encode(TEXTS, prompt_name=prompt_name)
        assert cosine(ours.encode(TEXTS, prompt_name=prompt_name), expected).min() >= 0.9999, prompt_name
        if prompt:  # the prompt must matter, or this comparison could not fail
            assert cosine(expected, plain).min() < 0.999
    long_expected = expected_model.encode(LONG_TEXTS)
    assert cosine(ours.encode(LONG_TEXTS, truncate=True), long_expected).min() >= 0.9999
    assert cosine(ours.encode(LONG_TEXTS, truncate=True, truncation_direction="right"), long_expected).min() >= 0.9999
    expected_model.tokenizer.truncation_side = "left"
    left_expected = expected_model.encode(LONG_TEXTS)
    assert cosine(left_expected, long_expected).max() < 0.999
    assert cosine(ours.encode(LONG_TEXTS, truncate=True, truncation_direction="left"), left_expected).min() >= 0.9999


def test_default_prompt_applies_unless_turned_off(st_folders):
    folder = st_folders["st6-saved"]
    expected_model = reference(folder)
    assert expected_model.default_prompt_name == "document"
    ours = SentenceEncoder(folder, device="cpu")
    assert cosine(ours.encode(TEXTS), expected_model.encode(TEXTS, prompt="doc: ")).min() >= 0.9999
    without = SentenceEncoder(folder, device="cpu", default_prompt_name="")
    assert cosine(without.encode(TEXTS), expected_model.encode(TEXTS, prompt="")).min() >= 0.9999
    extra = SentenceEncoder(folder, device="cpu", prompts={"title": "title: "})
    assert cosine(extra.encode(TEXTS, prompt_name="title"),
                  expected_model.encode(TEXTS, prompt="title: ")).min() >= 0.9999
    with pytest.raises(ValueError, match="unknown prompt_name 'nope'.*'document'.*'query'"):
        ours.encode(TEXTS, prompt_name="nope")
    with pytest.raises(ValueError, match="not both"):
        ours.encode(TEXTS, prompt_name="query", prompt="query: ")


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    full = tokenizer("word")["input_ids"]
    plain = tokenizer("word", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    return full[:start], full[start + len(plain):]


@pytest.mark.parametrize("name, prompt_name", [("qwen3-lasttoken", "query"), ("bert-weightedmean", None),
                                               ("bert-exclude-prompt", "query"), ("t5-encoder", None),
                                               ("bert-dense-normalize", None)])
def test_folded_input_pools_over_the_unfolded_sequence(st_folders, name, prompt_name):
    """Reference: sentence-transformers' own transformer run segment by segment, AllenNLP's
    unfolding (inner specials dropped), then sentence-transformers' own Pooling and later modules."""
    expected_model = reference(st_folders[name])
    ours = SentenceEncoder(st_folders[name], device="cpu", max_length=24)
    tokenizer = expected_model.tokenizer
    prompt = ours.settings.prompts[prompt_name] if prompt_name else ""
    pieces = tokenizer(prompt + LONG_TEXTS[1], add_special_tokens=False)["input_ids"]
    start, end = _specials(tokenizer)
    chunk = 24 - len(start) - len(end)
    segments = [start + pieces[i:i + chunk] + end for i in range(0, len(pieces), chunk)]
    assert len(segments) > 3
    parts = []
    with torch.no_grad():
        for number, ids in enumerate(segments):
            hidden = expected_model[0].auto_model(input_ids=torch.tensor([ids]))[0][0]
            parts.append(hidden[0 if number == 0 else len(start):len(ids) if number == len(segments) - 1
                                else len(ids) - len(end)])
        features = {"token_embeddings": torch.cat(parts)[None], "attention_mask": torch.ones(1, len(pieces) +
                                                                                               len(start) + len(end))}
        if prompt:
            features["prompt_length"] = expected_model[0]._get_prompt_length(prompt)
        for module in list(expected_model)[1:]:
            features = module(features)
    expected = features["sentence_embedding"].numpy()
    vectors = ours.encode([LONG_TEXTS[1]], prompt_name=prompt_name)
    assert cosine(vectors, expected).min() >= 0.9999


def _edited_copy(source: str, target: Path, **edits: dict) -> str:
    """A copy of a folder with some JSON files changed (file name -> new content, None to delete)."""
    shutil.copytree(source, target)
    for name, content in edits.items():
        path = target / name.replace("__", "/")
        if content is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content))
    return str(target)


def test_unsupported_folders_are_refused_with_the_module_and_folder(tmp_path, minilm_path):
    unknown = tmp_path / "unknown"
    unknown_module(unknown, minilm_path)
    with pytest.raises(UnsupportedModelError, match=rf"{unknown}.*my_package\.modules\.CustomRerank.*2_Rerank"):
        SentenceEncoder(str(unknown), device="cpu")

    base = tmp_path / "base"
    bert_mean(base, minilm_path)
    modules = json.loads((base / "modules.json").read_text())
    cases = {
        "task": ({"sentence_bert_config.json": {"max_seq_length": 64, "transformer_task": "text-generation"}},
                 "transformer_task 'text-generation'"),
        "chat": ({"sentence_bert_config.json": {"max_seq_length": 64, "modality_config": {
            "text": {"method": "forward", "method_output_name": "last_hidden_state"},
            "message": {"method": "forward", "method_output_name": "last_hidden_state"}}}}, "message"),
        "no-pooling": ({"modules.json": modules[:1]}, "no Pooling module"),
        "sparse": ({"config_sentence_transformers.json": {"model_type": "SparseEncoder"}}, "SparseEncoder"),
        "bad-mode": ({"1_Pooling__config.json": {"embedding_dimension": 32, "pooling_mode": "median"}},
                     "Unknown pooling 'median'"),
        "too-long": ({"sentence_bert_config.json": {"max_seq_length": 300}}, "max_seq_length 300 .* 128 positions"),
        "lowercase": ({"sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": True},
                       "tokenizer_config.json": {"do_lower_case": False, "tokenizer_class": "BertTokenizer"},
                       "tokenizer.json": None}, "do_lower_case"),
    }
    for case, (edits, message) in cases.items():
        folder = _edited_copy(str(base), tmp_path / case, **edits)
        with pytest.raises(ValueError, match=message):
            SentenceEncoder(folder, device="cpu")
    dense = _edited_copy(str(base), tmp_path / "dense", **{"modules.json": modules[:2] + [
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
        "2_Dense__config.json": {"in_features": 32, "out_features": 8, "activation_function": "my.Activation"}})
    with pytest.raises(UnsupportedModelError, match="my.Activation"):
        SentenceEncoder(dense, device="cpu")


def test_max_length_follows_the_model(minilm_path, st_folders, tiny_roberta_path, tiny_t5_path):
    assert SentenceEncoder(minilm_path, device="cpu").settings.max_length == 256  # sentence_bert_config.json
    assert SentenceEncoder(st_folders["mpnet"], device="cpu").settings.max_length == 64  # the tokenizer's
    # tokenizer 512, RoBERTa positions 130 less its padding offset (pad id 0 + 1)
    assert SentenceEncoder(tiny_roberta_path, device="cpu").settings.max_length == 129
    assert SentenceEncoder(tiny_t5_path, device="cpu").settings.max_length == 512  # relative positions: fallback
    assert SentenceEncoder(minilm_path, device="cpu", max_length=512).settings.max_length == 512
    with pytest.raises(ValueError, match="max_length 600 is more than the 512 positions"):
        SentenceEncoder(minilm_path, device="cpu", max_length=600)


def test_prompt_before_words_and_left_truncation_keep_word_offsets(minilm_path):
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=8)
    words = [["Embeddings", "turn", "text", "into", "vectors", "quickly"]]
    plain = indexer.fold(words=words, return_wordpieces=True)
    prompted = indexer.fold(words=words, prompt="query: ", return_wordpieces=True)
    shift = len(indexer.tokenizer("query: ", add_special_tokens=False)["input_ids"])
    assert prompted.prompt_lengths.tolist() == [1 + shift]  # [CLS] and the prompt's wordpieces
    np.testing.assert_array_equal(prompted.word_offsets, plain.word_offsets + shift)
    assert prompted.wordpieces[0][1:1 + shift] == ["query", ":"]
    left = indexer.fold(words=words, truncate=True, truncation_direction="left", return_wordpieces=True)
    assert plain.wordpieces[0] == ["[CLS]", "em", "##bed", "##ding", "##s", "turn", "text", "into", "vectors",
                                   "quickly", "[SEP]"]
    assert left.wordpieces[0] == ["[CLS]", "##s", "turn", "text", "into", "vectors", "quickly", "[SEP]"]
    # the first word keeps the one wordpiece left of it; the others move 3 to the left
    assert left.word_offsets.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6]]
    right = indexer.fold(words=words, truncate=True, return_wordpieces=True)
    assert right.word_offsets.tolist() == [[1, 4], [5, 5], [6, 6], [-1, -1], [-1, -1], [-1, -1]]
