"""Late chunking in the library: chunk plans, character offsets, and chunk vectors against the plain
``transformers`` model run on the whole document."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoTokenizer

from embedder import PretrainedTransformerIndexer, SentenceEncoder
from embedder.chunking import chunk_vectors, plan_chunks, spans_to_pieces
from references import reference_folded_output

UNICODE_DOCUMENTS = [
    "Café au lait, naïve façade — déjà vu.   Many   spaces\n\nand newlines\tand tabs. " * 6,
    "東京は日本の首都です。大阪は食べ物で有名です。" * 8 + " Emoji 🙂🚀 in text, 🇫🇷 flags too. " * 5,
    "Supercalifragilisticexpialidocious " * 3 + "x " * 40 + "Pneumonoultramicroscopicsilicovolcanoconiosis.",
]


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@settings(max_examples=300, deadline=None)
@given(word_lengths=st.lists(st.integers(1, 12), min_size=1, max_size=60), chunk_size=st.integers(1, 40),
       overlap_fraction=st.floats(0, 0.95))
def test_chunk_plans_cover_every_wordpiece_in_whole_words(word_lengths, chunk_size, overlap_fraction):
    overlap = min(int(chunk_size * overlap_fraction), chunk_size - 1)
    starts = np.concatenate(([0], np.cumsum(word_lengths)[:-1])).tolist()
    total = int(sum(word_lengths))
    windows = plan_chunks(starts, total, chunk_size, overlap)
    boundaries = set(starts) | {total}
    covered = np.zeros(total, dtype=bool)
    for number, (start, end) in enumerate(windows):
        assert start in boundaries and end in boundaries and start < end  # no word is split
        assert end - start <= chunk_size or len([b for b in boundaries if start < b < end]) == 0  # a long word alone
        covered[start:end] = True
        if number:
            previous_start, previous_end = windows[number - 1]
            assert previous_start < start <= previous_end  # forward, no gap
            stride = [b for b in boundaries if previous_start < b <= previous_start + chunk_size - overlap]
            # the last word start within the stride, or the next one for a long word
            assert start == (max(stride) if stride else min(b for b in boundaries if b > previous_start))
            if overlap == 0:
                assert start == previous_end
    assert covered.all() and windows[0][0] == 0 and windows[-1][1] == total


def test_chunk_plan_overlap_and_size():
    starts = list(range(0, 20, 2))  # ten words of two wordpieces
    assert plan_chunks(starts, 20, chunk_size=6) == [(0, 6), (6, 12), (12, 18), (18, 20)]
    assert plan_chunks(starts, 20, chunk_size=6, chunk_overlap=2) == [(0, 6), (4, 10), (8, 14), (12, 18), (16, 20)]
    assert plan_chunks([0, 9], 11, chunk_size=4) == [(0, 9), (9, 11)]  # a 9-wordpiece word is a chunk alone
    with pytest.raises(ValueError, match="chunk_overlap"):
        plan_chunks(starts, 20, chunk_size=4, chunk_overlap=4)
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks(starts, 20, chunk_size=0)


@pytest.mark.parametrize("chunk_size, overlap", [(16, 0), (16, 5), (3, 1)])
def test_offsets_point_into_unicode_documents(minilm_path, chunk_size, overlap):
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=64)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = indexer.fold_chunks(UNICODE_DOCUMENTS, chunk_size=chunk_size, chunk_overlap=overlap)
    for document, table in zip(UNICODE_DOCUMENTS, batch.chunk_table()):
        encoding = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        word_ids, offsets = encoding.word_ids(), encoding["offset_mapping"]
        word_first_char = {word_ids[i]: offsets[i][0] for i in reversed(range(len(word_ids)))}
        covered = np.zeros(len(document), dtype=bool)
        for number, (start, end, count) in enumerate(table.tolist()):
            assert 0 <= start < end <= len(document) and document[start:end].strip()
            assert count <= chunk_size or document[start:end].count(" ") == 0  # a long word alone
            assert start in word_first_char.values()  # chunks start where the tokenizer's words start
            covered[start:end] = True
            if number and overlap == 0:
                assert start >= table[number - 1][1]  # no overlap
        characters = np.array([not c.isspace() for c in document])
        assert covered[characters].all(), "a non-space character is in no chunk"
    assert batch.num_wordpieces.tolist() == [len(tokenizer(d)["input_ids"]) for d in UNICODE_DOCUMENTS]


def test_caller_spans_and_their_errors(minilm_path):
    indexer = PretrainedTransformerIndexer(minilm_path)
    document = "First sentence here. Second one follows; and a third."
    spans = [[(0, 20), (21, 53), (6, 14)]]
    batch = indexer.fold_chunks([document], spans=spans)
    assert batch.chunk_table()[0][:, :2].tolist() == [[0, 20], [21, 53], [6, 14]]
    offsets = np.array(AutoTokenizer.from_pretrained(minilm_path)(document, add_special_tokens=False,
                                                                  return_offsets_mapping=True)["offset_mapping"])
    assert spans_to_pieces(offsets, [(6, 14)], len(document)) == [(1, 2)]  # "sentence"
    for bad, message in [((0, 99), "inside the document"), ((5, 5), "non-empty"), ((20, 21), "no token"),
                         ((1, 2, 3), "pair of integers")]:
        with pytest.raises(ValueError, match=message):
            indexer.fold_chunks([document], spans=[[bad]])
    with pytest.raises(ValueError, match="one list"):
        indexer.fold_chunks([document, document], spans=spans)


def test_late_chunks_equal_the_plain_model_on_the_whole_document(minilm_path):
    document = UNICODE_DOCUMENTS[0][:400]
    encoder = SentenceEncoder(minilm_path, device="cpu")
    (table, vectors), = encoder.encode_chunks([document], chunk_size=20, chunk_overlap=4)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    ids = tokenizer(document, return_tensors="pt")
    assert ids["input_ids"].shape[1] <= 256 and len(table) > 3  # one segment, several chunks
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(minilm_path).eval()(**ids).last_hidden_state[0]
    offsets = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for (start, end, count), vector in zip(table.tolist(), vectors):
        rows = [i + 1 for i, (s, e) in enumerate(offsets) if s >= start and e <= end]  # +1: [CLS]
        assert len(rows) == count
        expected = torch.nn.functional.normalize(hidden[rows].mean(0), dim=-1).numpy()  # MiniLM's Normalize
        assert cosine(vector, expected) >= 0.99999


def test_late_chunks_of_a_folded_document_equal_the_per_segment_reference(minilm_path):
    document = " ".join(UNICODE_DOCUMENTS) * 2
    encoder = SentenceEncoder(minilm_path, device="cpu", max_length=48)
    (table, vectors), = encoder.encode_chunks([document], chunk_size=30)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    pieces = tokenizer(document, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 5 * 48
    unfolded = reference_folded_output(AutoModel.from_pretrained(minilm_path).eval(), pieces,
                                       [tokenizer.cls_token_id], [tokenizer.sep_token_id], max_length=48)
    position = 1
    for (start, end, count), vector in zip(table.tolist(), vectors):
        expected = torch.nn.functional.normalize(unfolded[position:position + count].mean(0), dim=-1).numpy()
        assert cosine(vector, expected) >= 0.99999
        position += count
    assert position == len(pieces) + 1


def test_chunk_vectors_without_a_model_and_a_mean_pooling_model_only(st_folders):
    rows = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    torch.testing.assert_close(chunk_vectors(rows, [(0, 2), (1, 6)]), torch.stack([rows[0:2].mean(0),
                                                                                    rows[1:6].mean(0)]))
    with pytest.raises(ValueError, match="non-empty"):
        chunk_vectors(rows, [(3, 3)])
    cls_model = SentenceEncoder(st_folders["bert-cls-prompt"], device="cpu")
    with pytest.raises(ValueError, match="pools with cls"):
        cls_model.encode_chunks(["a text to chunk"])
    assert len(cls_model.encode_chunks(["a text to chunk"], pooling="mean")[0][0]) == 1
