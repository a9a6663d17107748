"""Rerankers in-process (``CrossEncoderScorer``), against sentence-transformers' ``CrossEncoder`` and the
plain ``transformers`` classifier."""

from __future__ import annotations

import json
import random
import re
import shutil
from functools import cache

import numpy as np
import pytest
import torch

from embedder import CrossEncoderScorer, PairScore, UnsupportedModelError
from embedder.chunking import TooManyChunksError
from reranker_folders import (LLM_PROMPTS, LLM_RERANKERS, RERANKERS, ST6_PROMPTS, build_rerankers, copy_with_changes,
                              patch_config)
from st_folders import TEXTS, TRAINING_TEXT

NAMES = [spec.name for spec in RERANKERS]
ONE_LABEL = [spec.name for spec in RERANKERS if spec.num_labels == 1]
SPECS = {spec.name: spec for spec in RERANKERS}
TOLERANCE = 1e-5
QUERIES = ["what is the capital of France?", "quick brown fox", "x"]
_WORDS = sorted(set(re.findall(r"[A-Za-zéèçïà]+", TRAINING_TEXT)))


def long_document(seed: int, sentences: int = 24) -> str:
    """A document far longer than every reranker's length, with no two windows alike (so the best
    window is one window, not a tie between copies)."""
    generator = random.Random(seed)
    parts = []
    for number in range(sentences):
        words = [generator.choice(_WORDS) for _ in range(generator.randint(5, 11))]
        parts.append(f"{' '.join(words).capitalize()} {number}{generator.choice(['.', ',', ';', '!', '?'])}")
    return "  ".join(parts) if seed % 2 else " ".join(parts) + "\n東京 は 日本 の 首都 です."


LONG_DOCUMENTS = [long_document(seed) for seed in range(3)]
#: A query longer than half of every reranker's length: too long to read a document in windows beside it.
LONG_QUERY = " ".join(["Paris is the capital and most populous city of France, again and again and again."] * 3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (on shared cores, more threads mostly wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    return build_rerankers(tmp_path_factory.mktemp("rerankers"), minilm_path)


@pytest.fixture(scope="module")
def loaded(folders):
    """``(CrossEncoder, CrossEncoderScorer)`` of a setup, each loaded once."""
    from sentence_transformers import CrossEncoder

    @cache
    def load(name: str) -> tuple[CrossEncoder, CrossEncoderScorer]:
        return CrossEncoder(folders[name], device="cpu"), CrossEncoderScorer(folders[name], device="cpu")

    return load


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max(initial=0.0))


def short_pairs() -> list[tuple[str, str]]:
    return [(query, text) for query in QUERIES for text in TEXTS]


@pytest.mark.parametrize("name", NAMES)
def test_folder_is_read_as_cross_encoder_reads_it(loaded, name):
    reference, scorer = loaded(name)
    assert scorer.max_length == reference.max_seq_length == SPECS[name].max_length
    assert scorer.num_labels == reference.num_labels == SPECS[name].num_labels
    assert type(scorer.activation) is type(reference.activation_fn)


@pytest.mark.parametrize("name", NAMES)
def test_pairs_that_fit_score_as_cross_encoder_predict(loaded, name):
    reference, scorer = loaded(name)
    pairs = short_pairs()
    expected = reference.predict(pairs)
    for batch_size in (5, 32):
        scores = scorer.predict(pairs, batch_size=batch_size)
        assert scores.shape == ((len(pairs),) if scorer.num_labels == 1 else (len(pairs), scorer.num_labels))
        assert max_diff(scores, expected) <= TOLERANCE
    results = scorer.score_pairs(pairs)
    assert all(isinstance(r, PairScore) and r.windows == 1 and (r.start, r.end) == (0, len(d))
               for r, (_, d) in zip(results, pairs))


@pytest.mark.parametrize("name", NAMES)
def test_truncate_cuts_as_cross_encoder_predict(loaded, name):
    reference, scorer = loaded(name)
    pairs = [(query, document) for query in (QUERIES[0], LONG_QUERY * 2) for document in LONG_DOCUMENTS]
    pairs.append((LONG_QUERY * 2, TEXTS[0]))
    assert max_diff(scorer.predict(pairs, truncate=True), reference.predict(pairs)) <= TOLERANCE
    for result, (query, document) in zip(scorer.score_pairs(pairs, truncate=True), pairs):
        assert result.windows == 1 and 0 <= result.start < result.end <= len(document)
    kept = scorer.score_pairs([(QUERIES[0], LONG_DOCUMENTS[0])], truncate=True)[0]
    assert kept.end < len(LONG_DOCUMENTS[0])


@pytest.mark.parametrize("name", NAMES)
def test_raw_scores_are_the_classifier_logits(loaded, folders, name):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reference, scorer = loaded(name)
    pairs = short_pairs()
    prompt = ST6_PROMPTS["query"] if name == "st6-identity" else ""
    tokenizer = AutoTokenizer.from_pretrained(folders[name])
    model = AutoModelForSequenceClassification.from_pretrained(folders[name], dtype=torch.float32).eval()
    with torch.inference_mode():
        inputs = tokenizer([prompt + q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")
        logits = model(**inputs).logits.numpy()
    raw = scorer.predict(pairs, activate=False)
    assert max_diff(raw, logits.squeeze(-1) if scorer.num_labels == 1 else logits) <= TOLERANCE
    assert max_diff(raw, reference.predict(pairs, activation_fn=torch.nn.Identity())) <= TOLERANCE
    if scorer.num_labels > 1:
        assert max_diff(scorer.predict(pairs, apply_softmax=True),
                        reference.predict(pairs, apply_softmax=True)) <= TOLERANCE


def check_windows(scorer: CrossEncoderScorer, query: str, document: str, spans: list[tuple[int, int]]) -> None:
    """The windows, checked with the tokenizer alone: each fits beside the query, its text
    tokenizes to a run of the document's own wordpieces, and together they cover the document."""
    tokenizer = scorer.tokenizer
    encoded = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    starts = [offset[0] for offset in offsets]
    assert spans[0][0] == offsets[0][0] and spans[-1][1] == offsets[-1][1]
    covered_to = -1
    for start, end in spans:
        assert len(tokenizer(query, document[start:end])["input_ids"]) <= scorer.max_length
        first = starts.index(start)
        pieces = tokenizer(document[start:end], add_special_tokens=False)["input_ids"]
        assert pieces == ids[first:first + len(pieces)]
        assert first <= covered_to + 1
        covered_to = first + len(pieces) - 1
    assert covered_to == len(ids) - 1


@pytest.mark.parametrize("name", ONE_LABEL)
def test_long_documents_score_their_best_window(loaded, name):
    reference, scorer = loaded(name)
    pairs = [(query, document) for query in QUERIES[:2] for document in LONG_DOCUMENTS] + short_pairs()[:3]
    results = scorer.score_pairs(pairs, batch_size=5)
    assert max_diff(scorer.predict(pairs), [r.score for r in results]) <= TOLERANCE
    for result, (query, document) in zip(results, pairs):
        spans = scorer.plan_windows(query, document)
        if len(spans) == 1:
            assert spans == [(0, len(document))]
            continue
        check_windows(scorer, query, document, spans)
        window_scores = reference.predict([(query, document[start:end]) for start, end in spans])
        assert result.windows == len(spans) > 2
        assert abs(result.score - window_scores.max()) <= TOLERANCE
        assert (result.start, result.end) == spans[int(window_scores.argmax())]


@pytest.mark.parametrize("name", ["bert-plain", "xlmr-reranker"])
def test_first_and_mean_aggregates_and_overlap(loaded, name):
    reference, scorer = loaded(name)
    query, document = QUERIES[0], LONG_DOCUMENTS[1]
    for overlap in (None, 0, 10):
        spans = scorer.plan_windows(query, document, window_overlap=overlap)
        check_windows(scorer, query, document, spans)
        window_scores = reference.predict([(query, document[start:end]) for start, end in spans])
        first = scorer.score_pairs([(query, document)], aggregate="first", window_overlap=overlap)[0]
        mean = scorer.score_pairs([(query, document)], aggregate="mean", window_overlap=overlap)[0]
        assert abs(first.score - window_scores[0]) <= TOLERANCE and (first.start, first.end) == spans[0]
        assert abs(mean.score - window_scores.mean()) <= TOLERANCE
        assert (mean.start, mean.end) == (spans[0][0], spans[-1][1])
        if overlap == 0:
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="window_overlap"):
        scorer.predict([(query, document)], window_overlap=10_000)


@pytest.mark.parametrize("name", ["bert-3-labels", "bert-3-labels-sigmoid"])
def test_several_labels_average_their_windows(loaded, name):
    reference, scorer = loaded(name)
    query, document = QUERIES[1], LONG_DOCUMENTS[0]
    spans = scorer.plan_windows(query, document)
    window_scores = reference.predict([(query, document[start:end]) for start, end in spans])
    assert max_diff(scorer.predict([(query, document)], aggregate="mean")[0], window_scores.mean(axis=0)) <= TOLERANCE
    with pytest.raises(ValueError, match="one-label"):
        scorer.predict([(query, document)])
    with pytest.raises(ValueError, match="3 labels"):
        scorer.rank(query, [document])


@pytest.mark.parametrize("name", ONE_LABEL)
def test_rank_as_cross_encoder_rank(loaded, name):
    reference, scorer = loaded(name)
    documents = TEXTS + LONG_DOCUMENTS
    for top_k in (None, 2):
        expected = reference.rank(QUERIES[0], documents, top_k=top_k, return_documents=True)
        ranked = scorer.rank(QUERIES[0], documents, top_k=top_k, return_documents=True, truncate=True)
        assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in expected]
        assert max_diff([r["score"] for r in ranked], [r["score"] for r in expected]) <= TOLERANCE
        assert [r["text"] for r in ranked] == [r["text"] for r in expected]
    best = scorer.rank(QUERIES[0], LONG_DOCUMENTS)
    assert [r["score"] for r in best] == sorted((r["score"] for r in best), reverse=True)
    for entry in best:
        document = LONG_DOCUMENTS[entry["corpus_id"]]
        window = reference.predict([(QUERIES[0], document[entry["start"]:entry["end"]])])[0]
        assert abs(window - entry["score"]) <= TOLERANCE
    assert scorer.rank(QUERIES[0], []) == []


def test_max_length_override_as_cross_encoder(folders):
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(folders["bert-plain"], max_length=32, device="cpu")
    scorer = CrossEncoderScorer(folders["bert-plain"], max_length=32, device="cpu")
    assert scorer.max_length == reference.max_seq_length == 32
    pairs = short_pairs() + [(QUERIES[0], document) for document in LONG_DOCUMENTS]
    assert max_diff(scorer.predict(pairs, truncate=True), reference.predict(pairs)) <= TOLERANCE
    with pytest.raises(ValueError, match="more than the 64 positions"):
        CrossEncoderScorer(folders["bert-plain"], max_length=100, device="cpu")


def test_max_seq_length_of_the_transformer_module_as_cross_encoder(folders, tmp_path):
    from sentence_transformers import CrossEncoder

    folder = copy_with_changes(folders["st6-identity"], tmp_path / "st6-40", "sentence_bert_config.json",
                               max_seq_length=40)
    reference, scorer = CrossEncoder(folder, device="cpu"), CrossEncoderScorer(folder, device="cpu")
    assert scorer.max_length == reference.max_seq_length == 40
    pairs = short_pairs() + [(QUERIES[0], document) for document in LONG_DOCUMENTS]
    assert max_diff(scorer.predict(pairs, truncate=True), reference.predict(pairs)) <= TOLERANCE


def test_queries_too_long_and_empty_documents_are_refused(loaded):
    _, scorer = loaded("bert-plain")
    with pytest.raises(ValueError, match=r"the query has \d+ tokens, more than half of max_length 64"):
        scorer.predict([(QUERIES[0], TEXTS[0]), (LONG_QUERY, LONG_DOCUMENTS[0])])
    assert scorer.predict([(LONG_QUERY, LONG_DOCUMENTS[0])], truncate=True).shape == (1,)
    for empty in ("", "   \n"):
        with pytest.raises(ValueError, match="document 1 is empty"):
            scorer.predict([(QUERIES[0], TEXTS[0]), (QUERIES[0], empty)])
    with pytest.raises(TooManyChunksError):
        scorer.predict([(QUERIES[0], document) for document in LONG_DOCUMENTS], max_windows=5)
    with pytest.raises(TypeError):
        scorer.predict([(QUERIES[0], 3)])
    assert scorer.predict([]).shape == (0,)


@pytest.mark.parametrize("value", ["torch.nn.modules.activation.Hardshrink", "my_package.activations.Clip",
                                   "os.system"])
def test_unknown_activations_are_refused(folders, tmp_path, value):
    plain = copy_with_changes(folders["bert-plain"], tmp_path / "plain",
                              sentence_transformers={"activation_fn": value})
    with pytest.raises(ValueError, match=re.escape(f"{plain}/config.json") + ".*" + re.escape(repr(value))):
        CrossEncoderScorer(plain, device="cpu")
    saved = copy_with_changes(folders["st6-identity"], tmp_path / "saved", "config_sentence_transformers.json",
                              activation_fn=value)
    with pytest.raises(ValueError, match=re.escape(f"{saved}/config_sentence_transformers.json")
                       + ".*" + re.escape(repr(value))):
        CrossEncoderScorer(saved, device="cpu")


def test_folders_that_cannot_be_honoured_are_refused(folders, tiny_bert_path, tmp_path):
    with pytest.raises(UnsupportedModelError, match="ForSequenceClassification"):
        CrossEncoderScorer(tiny_bert_path, device="cpu")
    extra = copy_with_changes(folders["st6-identity"], tmp_path / "extra", "config_sentence_transformers.json")
    modules = json.loads((tmp_path / "extra" / "modules.json").read_text())
    modules.append({"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.base.modules.Dense"})
    (tmp_path / "extra" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match=re.escape(extra) + ".*sentence_transformers.base.modules.Dense"):
        CrossEncoderScorer(extra, device="cpu")
    sentence = copy_with_changes(folders["st6-identity"], tmp_path / "sentence", "config_sentence_transformers.json",
                                 model_type="SentenceTransformer")
    with pytest.raises(UnsupportedModelError, match="a SentenceTransformer model, not a CrossEncoder"):
        CrossEncoderScorer(sentence, device="cpu")
    llm = copy_with_changes(folders["st6-identity"], tmp_path / "llm", "sentence_bert_config.json",
                            transformer_task="text-generation")
    with pytest.raises(UnsupportedModelError, match=re.escape(llm) + ".*Transformer module.*text-generation"):
        CrossEncoderScorer(llm, device="cpu")
    patch_config(tmp_path / "llm", "sentence_bert_config.json", transformer_task="sequence-classification",
                 model_kwargs={"quantization_config": {"load_in_8bit": True}})
    with pytest.raises(UnsupportedModelError, match="quantization_config"):
        CrossEncoderScorer(llm, device="cpu")


# --- LLM rerankers (Qwen3-Reranker style: a causal LM, LogitScore, a chat template) -----------------

LLM_NAMES = [spec.name for spec in LLM_RERANKERS]
LLM_SPECS = {spec.name: spec for spec in LLM_RERANKERS}


@pytest.fixture(scope="module")
def llm_folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    return build_rerankers(tmp_path_factory.mktemp("llm-rerankers"), minilm_path, LLM_RERANKERS)


@pytest.fixture(scope="module")
def llm_loaded(llm_folders):
    from sentence_transformers import CrossEncoder

    @cache
    def load(name: str) -> tuple[CrossEncoder, CrossEncoderScorer]:
        return CrossEncoder(llm_folders[name], device="cpu"), CrossEncoderScorer(llm_folders[name], device="cpu")

    return load


def mixed_pairs() -> list[tuple[str, str]]:
    """Pairs of very different lengths, so that a batch pads most of them (on the left)."""
    return short_pairs() + [(QUERIES[1], TRAINING_TEXT[:400]), (QUERIES[2], TRAINING_TEXT[500:620])]


@pytest.mark.parametrize("name", LLM_NAMES)
def test_llm_folder_is_read_as_cross_encoder_reads_it(llm_loaded, name):
    reference, scorer = llm_loaded(name)
    assert scorer.max_length == reference.max_seq_length == LLM_SPECS[name].max_length
    assert scorer.num_labels == reference.num_labels == 1 and scorer.folder.num_labels == 1
    assert type(scorer.activation) is type(reference.activation_fn) is torch.nn.Sigmoid
    assert scorer.folder.is_llm and scorer.folder.message_format == "flat"
    logit_score = reference[1]
    assert (scorer.head.true_token_id, scorer.head.false_token_id) == (logit_score.true_token_id,
                                                                       logit_score.false_token_id)
    assert scorer.tokenizer.convert_ids_to_tokens([scorer.head.true_token_id, scorer.head.false_token_id]) \
        == ["yes", "no"]


@pytest.mark.parametrize("name", LLM_NAMES)
def test_llm_pairs_that_fit_score_as_cross_encoder_predict(llm_loaded, name):
    reference, scorer = llm_loaded(name)
    pairs = mixed_pairs()
    expected = reference.predict(pairs)
    for batch_size in (4, 32):
        assert max_diff(scorer.predict(pairs, batch_size=batch_size), expected) <= TOLERANCE
    results = scorer.score_pairs(pairs)
    assert all(r.windows == 1 and (r.start, r.end) == (0, len(d)) for r, (_, d) in zip(results, pairs))
    for prompt in ("", LLM_PROMPTS["short"], "Rank passages about foxes"):
        assert max_diff(scorer.predict(pairs, prompt=prompt), reference.predict(pairs, prompt=prompt)) <= TOLERANCE
    if name == "qwen3-llm-reranker":
        assert max_diff(scorer.predict(pairs, prompt_name="short"),
                        reference.predict(pairs, prompt_name="short")) <= TOLERANCE


@pytest.mark.parametrize("name", LLM_NAMES)
def test_llm_truncate_cuts_as_cross_encoder_predict(llm_loaded, name):
    reference, scorer = llm_loaded(name)
    pairs = [(query, document) for query in (QUERIES[0], LONG_QUERY * 3) for document in LONG_DOCUMENTS]
    pairs += [(LONG_QUERY * 3, TEXTS[0]), (QUERIES[2], TEXTS[1])]
    assert max_diff(scorer.predict(pairs, truncate=True, batch_size=3), reference.predict(pairs)) <= TOLERANCE
    results = scorer.score_pairs(pairs, truncate=True)
    assert all(r.windows == 1 and 0 <= r.start <= r.end <= len(d) for r, (_, d) in zip(results, pairs))
    assert 0 < results[0].end < len(LONG_DOCUMENTS[0])
    assert (results[-3].start, results[-3].end) == (0, 0)  # a query that long leaves no room for the document
    assert (results[-1].start, results[-1].end) == (0, len(TEXTS[1]))


@pytest.mark.parametrize("name", LLM_NAMES)
def test_llm_long_documents_score_their_best_window(llm_loaded, name):
    reference, scorer = llm_loaded(name)
    pairs = [(query, document) for query in QUERIES[:2] for document in LONG_DOCUMENTS] + short_pairs()[:3]
    results = scorer.score_pairs(pairs, batch_size=5)
    assert max_diff(scorer.predict(pairs), [r.score for r in results]) <= TOLERANCE
    windowed = 0
    for result, (query, document) in zip(results, pairs):
        spans = scorer.plan_windows(query, document)
        if len(spans) == 1:
            assert spans == [(0, len(document))]
            continue
        windowed += 1
        windows = [(query, document[start:end]) for start, end in spans]
        # each window fits as sentence-transformers renders it (the template's tokens counted)
        assert all(reference.preprocess([pair], prompt=LLM_PROMPTS["web"] if name == "qwen3-llm-reranker" else None)
                   ["input_ids"].shape[1] <= scorer.max_length for pair in windows)
        assert spans[0][0] == 0 and spans[-1][1] == len(document.rstrip())
        assert all(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # consecutive windows overlap
        window_scores = reference.predict(windows)
        assert result.windows == len(spans) >= 2
        assert abs(result.score - window_scores.max()) <= TOLERANCE
        assert (result.start, result.end) == spans[int(window_scores.argmax())]
    assert windowed == 6


@pytest.mark.parametrize("name", LLM_NAMES)
def test_llm_raw_scores_are_yes_minus_no_of_the_causal_lm(llm_loaded, llm_folders, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, scorer = llm_loaded(name)
    pairs = mixed_pairs()
    instruction = LLM_PROMPTS["web"] if name == "qwen3-llm-reranker" else None
    tokenizer = AutoTokenizer.from_pretrained(llm_folders[name])
    model = AutoModelForCausalLM.from_pretrained(llm_folders[name], dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(([{"role": "system", "content": instruction}] if instruction else [])
                                           + [{"role": "query", "content": q}, {"role": "document", "content": d}],
                                           tokenize=False) for q, d in pairs]
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    with torch.inference_mode():
        inputs = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
        logits = model(**inputs).logits[:, -1]
    raw = scorer.predict(pairs, activate=False)
    assert max_diff(raw, (logits[:, yes] - logits[:, no]).numpy()) <= TOLERANCE
    assert max_diff(raw, reference.predict(pairs, activation_fn=torch.nn.Identity())) <= TOLERANCE
    assert max_diff(scorer.predict(pairs), torch.sigmoid(torch.from_numpy(raw)).numpy()) <= TOLERANCE


def test_llm_rank_and_limits(llm_loaded):
    reference, scorer = llm_loaded("qwen3-llm-reranker")
    documents = TEXTS + LONG_DOCUMENTS
    expected = reference.rank(QUERIES[0], documents, top_k=4, return_documents=True)
    ranked = scorer.rank(QUERIES[0], documents, top_k=4, return_documents=True, truncate=True)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in expected]
    assert max_diff([r["score"] for r in ranked], [r["score"] for r in expected]) <= TOLERANCE
    with pytest.raises(ValueError, match=r"the query in its prompt template has \d+ tokens, more than half"):
        scorer.predict([(LONG_QUERY, LONG_DOCUMENTS[0])])
    with pytest.raises(ValueError, match="scores pairs, not single texts"):
        scorer.plan_texts(["a single text"])
    with pytest.raises(ValueError, match="document 0 is empty"):
        scorer.predict([(QUERIES[0], "")])


def test_llm_folders_that_cannot_be_honoured_are_refused(llm_folders, tmp_path):
    saved = llm_folders["qwen3-llm-reranker"]
    cases = {
        "drops-document": ("<|im_start|>user\n{{ messages | selectattr('role', 'eq', 'query') "
                           "| map(attribute='content') | first }}<|im_end|>", "cannot carry a 'query'/'document' pair"),
        "trims": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}",
                  "must place them verbatim"),
    }
    for label, (chat_template, message) in cases.items():
        folder = tmp_path / label
        shutil.copytree(saved, folder)
        (folder / "chat_template.jinja").write_text(chat_template)
        with pytest.raises(UnsupportedModelError, match=re.escape(str(folder)) + ".*" + re.escape(message)):
            CrossEncoderScorer(str(folder), device="cpu")
    other = copy_with_changes(saved, tmp_path / "logits", "1_LogitScore/config.json", module_input_name="scores")
    with pytest.raises(UnsupportedModelError, match=re.escape(other) + ".*LogitScore module.*module_input_name"):
        CrossEncoderScorer(other, device="cpu")
    alone = copy_with_changes(saved, tmp_path / "alone", "modules.json")
    modules = json.loads((tmp_path / "alone" / "modules.json").read_text())[:1]
    (tmp_path / "alone" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match=re.escape(alone) + ".*without a LogitScore module"):
        CrossEncoderScorer(alone, device="cpu")
    classifier = copy_with_changes(saved, tmp_path / "classifier", "sentence_bert_config.json",
                                   transformer_task="sequence-classification")
    with pytest.raises(UnsupportedModelError, match="LogitScore module needs a 'text-generation' Transformer"):
        CrossEncoderScorer(classifier, device="cpu")
