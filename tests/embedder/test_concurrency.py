"""Same numbers alone and under load: a tokenizer shared by threads changes no thread's answer.

Each test computes every request once alone, then runs all of them many times from many threads
at once (mixing calls that truncate with calls that do not, pairs with texts) and compares each
answer with its lone one, exactly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from reranker_folders import bert_plain
from sparse_folders import bert_splade_max

LONG = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun " * 120
QUERY = "what is the fox doing near the sleeping cat " * 3
THREADS = 8
ROUNDS = 24


def run_together(calls: dict, rounds: int = ROUNDS) -> None:
    """Run every call alone, then ``rounds`` times each from ``THREADS`` threads; assert equal answers."""
    alone = {name: call() for name, call in calls.items()}
    order = [name for _ in range(rounds) for name in calls]
    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(lambda name: (name, calls[name]()), order))
    for name, answer in answers:
        assert answer == alone[name], f"{name} answered differently among other calls"


def folded(batch) -> tuple:
    return (batch.token_ids.tolist(), batch.segment_lengths.tolist(), batch.num_wordpieces.tolist(),
            None if batch.type_ids is None else batch.type_ids.tolist())


def test_indexer_answers_alike_from_many_threads(minilm_path):
    from embedder.indexer import PretrainedTransformerIndexer

    indexer = PretrainedTransformerIndexer(minilm_path, max_length=64)
    run_together({
        "whole": lambda: folded(indexer.fold([LONG, "short text"])),
        "truncated": lambda: folded(indexer.fold([LONG], truncate=True)),
        "truncated left": lambda: folded(indexer.fold([LONG], truncate=True, truncation_direction="left")),
        "pairs cut": lambda: folded(indexer.fold(pairs=[(QUERY, LONG)], truncate=True)),
        "pairs cut left": lambda: folded(indexer.fold(pairs=[(QUERY, LONG)], truncate=True,
                                                      truncation_direction="left")),
        "pairs folded": lambda: folded(indexer.fold(pairs=[(QUERY, LONG)])),
        "words": lambda: folded(indexer.fold(words=[LONG.split()[:300]], prompt="query: ")),
        "chunks": lambda: folded(indexer.fold_chunks([LONG], chunk_size=32, chunk_overlap=8)),
    })
    whole = indexer.fold([LONG])
    assert int(whole.num_wordpieces[0]) > 1000 and whole.segment_lengths.max() <= 64


def test_cross_encoder_plans_alike_from_many_threads(tmp_path, minilm_path):
    from embedder.cross_encoder import CrossEncoderScorer

    bert_plain(tmp_path / "reranker", minilm_path)
    scorer = CrossEncoderScorer(str(tmp_path / "reranker"), dtype="float32", device="cpu")

    def plan(**kwargs) -> tuple:
        result = scorer.plan([(QUERY, LONG), (QUERY, "a short document")], **kwargs)
        return result.inputs["input_ids"], result.spans

    run_together({
        "windows": lambda: plan(),
        "truncated": lambda: plan(truncate=True),
        "texts truncated": lambda: scorer.plan_texts([LONG], truncate=True).inputs["input_ids"],
    })
    assert max(map(len, plan(truncate=True)[0])) <= scorer.max_length


def test_sparse_encoder_answers_alike_from_many_threads(tmp_path, minilm_path):
    from embedder.sparse_encoder import SparseEncoderModel

    bert_splade_max(tmp_path / "sparse", minilm_path)
    model = SparseEncoderModel(str(tmp_path / "sparse"), dtype="float32", device="cpu")

    def encode(truncate: bool) -> tuple:
        matrix = model.encode([LONG[:2000], "a short text"], truncate=truncate)
        return matrix.indices.tolist(), np.round(matrix.data, 6).tolist()

    run_together({"folded": lambda: encode(False), "truncated": lambda: encode(True)}, rounds=6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_shared_tokenizer_cannot_be_changed(minilm_path, side):
    from embedder.cache import get_tokenizer

    tokenizer = get_tokenizer(minilm_path)
    with pytest.raises(AttributeError, match="shared between threads"):
        tokenizer.truncation_side = side
    assert tokenizer.with_truncation_side(side).truncation_side == side


def test_prompt_caches_are_bounded(minilm_path):
    """A request may bring any prompt: the caches keyed by it keep at most PROMPT_CACHE_SIZE."""
    from embedder.indexer import PretrainedTransformerIndexer
    from embedder.shared_tokenizer import PROMPT_CACHE_SIZE

    indexer = PretrainedTransformerIndexer(minilm_path)
    lengths = [indexer.prompt_length(f"prompt number {n}: ") for n in range(PROMPT_CACHE_SIZE + 100)]
    assert lengths[0] == indexer.prompt_length("prompt number 0: ") > 1
    assert indexer._prompt_lengths.cache_info().currsize == PROMPT_CACHE_SIZE
