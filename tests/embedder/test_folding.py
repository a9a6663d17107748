"""Folding and unfolding long sequences, against AllenNLP's examples and the plain transformers model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, T5EncoderModel

from embedder import PretrainedTransformerEmbedder, PretrainedTransformerIndexer
from embedder.folding import fold_padded, unfold_padded
from embedder.indexer import to_padded_tensors
from references import reference_folded_output

LONG_TEXT = ("AllenNLP folds sequences that are longer than the model can take into several "
             "segments, runs each one, and stitches the vectors back together. ") * 6


def test_fold_padded_matches_allennlp_layout():
    token_ids = torch.tensor([
        [1, 101, 102, 103, 104, 2, 1, 105, 106, 107, 108, 2, 1, 109, 2],
        [1, 201, 202, 203, 204, 2, 1, 205, 206, 207, 208, 2, 0, 0, 0],
        [1, 301, 302, 303, 304, 2, 1, 305, 306, 2, 0, 0, 0, 0, 0],
    ])
    folded, mask, types = fold_padded(token_ids, token_ids > 0, None, max_length=6)
    assert types is None
    assert folded.tolist() == [
        [1, 101, 102, 103, 104, 2], [1, 105, 106, 107, 108, 2], [1, 109, 2, 0, 0, 0],
        [1, 201, 202, 203, 204, 2], [1, 205, 206, 207, 208, 2], [0, 0, 0, 0, 0, 0],
        [1, 301, 302, 303, 304, 2], [1, 305, 306, 2, 0, 0], [0, 0, 0, 0, 0, 0],
    ]
    assert mask.tolist() == (folded > 0).tolist()


def test_unfold_padded_matches_allennlp_example():
    # AllenNLP's own unfolding example: [CLS] is xxx1, [SEP] is xxx2, embeddings are 1-d.
    embeddings = torch.tensor([
        [1001, 111, 112, 113, 114, 1002],
        [2011, 121, 122, 123, 124, 2012],
        [3021, 131, 132, 133, 134, 3022],
        [1001, 211, 212, 213, 214, 1002],
        [2011, 221, 222, 223, 224, 2012],
        [3021, 231, 232, 233, 234, 3022],
        [1001, 311, 312, 313, 314, 1002],
        [2011, 321, 322, 323, 324, 2012],
        [0, 0, 0, 0, 0, 0],
    ]).unsqueeze(-1)
    mask = (embeddings.squeeze(-1) > 0).long()
    expected = torch.tensor([
        [1001, 111, 112, 113, 114, 121, 122, 123, 124, 131, 132, 133, 134, 3022],
        [1001, 211, 212, 213, 214, 221, 222, 223, 224, 231, 232, 233, 234, 3022],
        [1001, 311, 312, 313, 314, 321, 322, 323, 324, 2012, 0, 0, 0, 0],
    ]).unsqueeze(-1)
    assert torch.equal(unfold_padded(embeddings, mask, 3, 1, 1), expected)


def test_indexer_splits_like_allennlp(minilm_path):
    # AllenNLP's test_long_sequence_splitting, with max_length=4.
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    expected = tokenizer("AllenNLP is great")["input_ids"]
    assert len(expected) == 7
    cls_id, sep_id = expected[0], expected[-1]
    expected = expected[:3] + [sep_id, cls_id] + expected[3:5] + [sep_id, cls_id] + expected[5:]
    indexed = PretrainedTransformerIndexer(minilm_path, max_length=4)(["AllenNLP is great"])
    assert indexed["token_ids"][0].tolist() == expected
    assert indexed["segment_concat_mask"][0].tolist() == [True] * len(expected)
    assert indexed["mask"][0].tolist() == [True] * 7


def test_uneven_lengths_and_padding_segments(minilm_path):
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=6)
    texts = ["one", "one two three four five six seven eight nine ten eleven"]
    indexed = indexer(texts)
    assert indexed["token_ids"].shape == (2, 17)  # 6 + 6 + 5
    assert indexed["segment_concat_mask"][0].tolist() == [True] * 3 + [False] * 14
    assert indexed["mask"].sum(-1).tolist() == [3, 13]
    embedder = PretrainedTransformerEmbedder(minilm_path, max_length=6, train_parameters=False)
    with torch.no_grad():
        output = embedder(**indexed)
    assert output.shape == (2, 13, 384)
    assert torch.all(output[0, 3:] == 0)
    plain = PretrainedTransformerEmbedder(minilm_path, train_parameters=False)
    with torch.no_grad():
        alone = plain(**PretrainedTransformerIndexer(minilm_path)(["one"]))
    torch.testing.assert_close(output[0, :3], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path_fixture", ["minilm_path", "tiny_bert_path"])
def test_short_sequence_same_folded_and_unfolded(request, path_fixture):
    path = request.getfixturevalue(path_fixture)
    text = ["a short sentence that fits in one segment"]
    reference_model = AutoModel.from_pretrained(path).eval()
    reference_ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")
    with torch.no_grad():
        reference = reference_model(**reference_ids)[0]
        folded = PretrainedTransformerEmbedder(path, max_length=64, train_parameters=False)(
            **PretrainedTransformerIndexer(path, max_length=64)(text))
        unfolded = PretrainedTransformerEmbedder(path, train_parameters=False)(
            **PretrainedTransformerIndexer(path)(text))
    torch.testing.assert_close(folded, unfolded)
    torch.testing.assert_close(folded, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path_fixture", ["minilm_path", "tiny_bert_path"])
def test_long_sequence_equals_per_segment_reference(request, path_fixture):
    path = request.getfixturevalue(path_fixture)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pieces = tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]
    max_length = 32
    assert len(pieces) > 3 * max_length
    reference = reference_folded_output(AutoModel.from_pretrained(path).eval(), pieces,
                                        [tokenizer.cls_token_id], [tokenizer.sep_token_id], max_length)
    embedder = PretrainedTransformerEmbedder(path, max_length=max_length, train_parameters=False)
    with torch.no_grad():
        output = embedder(**PretrainedTransformerIndexer(path, max_length=max_length)([LONG_TEXT, "short"]))
    assert output.shape[1] == len(pieces) + 2
    torch.testing.assert_close(output[0], reference, atol=1e-5, rtol=1e-4)


def test_t5_encoder_without_start_token(tiny_t5_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_path)
    text = " ".join(f"w{i % 90}" for i in range(50))
    pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
    reference = reference_folded_output(T5EncoderModel.from_pretrained(tiny_t5_path).eval(), pieces,
                                        [], [tokenizer.eos_token_id], max_length=8)
    indexer = PretrainedTransformerIndexer(tiny_t5_path, max_length=8)
    assert (indexer.special.num_start, indexer.special.num_end) == (0, 1)
    embedder = PretrainedTransformerEmbedder(tiny_t5_path, max_length=8, sub_module="encoder",
                                             train_parameters=False)
    with torch.no_grad():
        output = embedder(**indexer([text, "w1 w2"]))
    assert output.shape == (2, 51, 32)
    torch.testing.assert_close(output[0], reference, atol=1e-5, rtol=1e-4)


def test_roberta_rejects_type_id_one(tiny_roberta_path):
    indexer = PretrainedTransformerIndexer(tiny_roberta_path)
    embedder = PretrainedTransformerEmbedder(tiny_roberta_path, train_parameters=False)
    indexed = indexer(pairs=[("first sentence", "second sentence")])
    assert indexed["type_ids"].max() == 1
    with pytest.raises(ValueError, match="type ids too large"):
        embedder(**indexed)
    indexed["type_ids"].zero_()
    assert embedder(**indexed).shape[0] == 1


def test_pair_type_ids_survive_folding(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    first, second = "a question about folding", "an answer " * 20
    encoded = tokenizer(first, second)
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=12)
    indexed = indexer(pairs=[(first, second)])
    ids, types = indexed["token_ids"][0], indexed["type_ids"][0]
    # every wordpiece of the second sentence keeps type 1 in whichever segment it lands
    second_piece_ids = set(tokenizer(second, add_special_tokens=False)["input_ids"])
    for token, type_id in zip(ids.tolist(), types.tolist()):
        if token in second_piece_ids:
            assert type_id == 1
    assert (types == 1).sum() == sum(encoded["token_type_ids"][1:-1])
    # and the model sees them: the output equals a per-segment reference with those type ids
    embedder = PretrainedTransformerEmbedder(minilm_path, max_length=12, train_parameters=False)
    reference_model = AutoModel.from_pretrained(minilm_path).eval()
    segments, segment_types = ids.split(12), types.split(12)
    with torch.no_grad():
        output = embedder(**indexed)[0]
        per_segment = [reference_model(input_ids=s[None], token_type_ids=t[None])[0][0]
                       for s, t in zip(segments, segment_types)]
    expected = torch.cat([per_segment[0][:-1]] + [p[1:-1] for p in per_segment[1:-1]] + [per_segment[-1][1:]])
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)


def test_fold_ragged_matches_padded_layout(minilm_path):
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=10)
    texts = ["tiny", LONG_TEXT, "a medium sized text with a few more words in it"]
    batch = indexer.fold(texts)
    padded = indexer(texts)
    assert batch.num_inputs == 3
    assert np.all(batch.segment_lengths <= 10)
    assert batch.num_wordpieces.tolist() == padded["mask"].sum(-1).tolist()
    rows = np.split(batch.token_ids, np.cumsum(np.add.reduceat(batch.segment_lengths,
                                                              batch.input_segment_starts()))[:-1])
    for row, ids in zip(padded["token_ids"], rows):
        assert row[:len(ids)].tolist() == ids.tolist()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lengths", [(40, 3), (3, 40), (25, 30), (31, 30)])
def test_truncated_pairs_are_cut_longest_first(minilm_path, side, lengths):
    """A long first text must not push the second one out: each keeps the share that the
    tokenizer's own ``longest_first`` truncation gives it, on the asked side."""
    first = " ".join(f"query{i}" for i in range(lengths[0]))
    second = " ".join(f"passage{i}" for i in range(lengths[1]))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, truncation_side=side)
    expected = tokenizer(first, second, truncation="longest_first", max_length=24, return_tensors="pt")
    indexer = PretrainedTransformerIndexer(minilm_path, max_length=24)
    batch = indexer.fold(pairs=[(first, second)], truncate=True, truncation_direction=side)
    assert batch.token_ids.tolist() == expected["input_ids"][0].tolist()
    assert batch.type_ids.tolist() == expected["token_type_ids"][0].tolist()
    embedder = PretrainedTransformerEmbedder(minilm_path, max_length=24, train_parameters=False)
    reference_model = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        output = embedder(**to_padded_tensors(batch, indexer.pad_token_id, folded=True))[0]
        reference = reference_model(**expected)[0][0]
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-4)
    assert indexer.tokenizer.truncation_side == "right"  # the shared tokenizer is left as it was
