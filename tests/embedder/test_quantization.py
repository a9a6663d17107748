"""``embedder.quantization`` against sentence-transformers' ``quantize_embeddings``, bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from embedder.quantization import (
    PRECISIONS,
    QuantizationRanges,
    calibration_ranges,
    check_ranges,
    cut_ranges,
    load_ranges_file,
    quantize,
    quantized_dtype,
    quantized_width,
    read_calibration_corpus,
    vector_bytes,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers.quantization import quantize_embeddings


def normalized(rng, shape) -> np.ndarray:
    vectors = rng.normal(size=shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


@pytest.mark.parametrize("dim", [384, 37, 8, 1])
def test_every_precision_equals_quantize_embeddings(dim):
    rng = np.random.default_rng(dim)
    vectors = normalized(rng, (64, dim))
    ranges = calibration_ranges(normalized(rng, (500, dim)))  # some of the 64 fall outside: clipped
    ranges[:, 0] = 0.25  # a dimension with no width: its step is 1, as sentence-transformers makes it
    for precision in PRECISIONS:
        ours, theirs = quantize(vectors, precision, ranges), quantize_embeddings(vectors, precision, ranges=ranges)
        assert ours.dtype == theirs.dtype == quantized_dtype(precision)
        assert ours.shape == theirs.shape == (64, quantized_width(dim, precision))
        np.testing.assert_array_equal(ours, theirs)
        for row in (0, 17, 63):  # a vector alone: the same bytes as inside the batch
            np.testing.assert_array_equal(quantize(vectors[row], precision, ranges), ours[row])
            np.testing.assert_array_equal(quantize(vectors[row:row + 1], precision, ranges), ours[row:row + 1])


def test_values_on_bucket_edges_and_outside_the_ranges():
    ranges = np.array([[-1.0, 0.0, -0.5], [1.0, 255.0, 0.5]], dtype=np.float32)
    starts, steps = ranges[0], (ranges[1] - ranges[0]) / 255
    edges = starts + np.arange(256, dtype=np.float32)[:, None] * steps  # every edge, in float32
    vectors = np.concatenate([edges, edges + 1e-7, edges - 1e-7, [[-5, -5, -5], [5, 300, 5], [0, 0, 0]]]
                             ).astype(np.float32)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        np.testing.assert_array_equal(quantize(vectors, precision, ranges),
                                      quantize_embeddings(vectors, precision, ranges=ranges))
    assert quantize(np.float32([[-5, -5, -5]]), "uint8", ranges).tolist() == [[0, 0, 0]]
    assert quantize(np.float32([[5, 300, 5]]), "int8", ranges).tolist() == [[127, 127, 127]]


def test_calibration_ranges_are_those_of_calibration_embeddings():
    rng = np.random.default_rng(1)
    vectors, corpus = normalized(rng, (20, 48)), normalized(rng, (300, 48))
    for precision in ("int8", "uint8"):
        np.testing.assert_array_equal(
            quantize(vectors, precision, calibration_ranges(corpus)),
            quantize_embeddings(vectors, precision, calibration_embeddings=corpus))
    with pytest.raises(ValueError, match="at least two vectors"):
        calibration_ranges(corpus[:1])


def test_ranges_are_required_and_must_fit():
    vectors = normalized(np.random.default_rng(2), (3, 16))
    with pytest.raises(ValueError, match=r"int8 needs ranges of shape \[2, dim\]"):
        quantize(vectors, "int8")  # never calibrated on the vectors themselves
    with pytest.raises(ValueError, match=r"must be \[2, 16\]"):
        quantize(vectors, "uint8", np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize(vectors, "int4")
    with pytest.raises(ValueError, match="must be float"):
        quantize(quantize(vectors, "binary"), "binary")
    with pytest.raises(ValueError, match=r"shape \[2, dim\]"):
        check_ranges(np.zeros((3, 4)), "x.npy")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_ranges(np.float32([[0, np.nan], [1, 1]]), "x.npy")
    with pytest.raises(ValueError, match="max below the min in 1 dimensions"):
        check_ranges(np.float32([[0, 2], [1, 1]]), "x.npy")


def test_cut_ranges_are_the_first_dimensions():
    rng = np.random.default_rng(3)
    ranges = calibration_ranges(normalized(rng, (100, 64)))
    cut = normalized(rng, (5, 64))[:, :16]
    np.testing.assert_array_equal(quantize(cut, "int8", cut_ranges(ranges, 16)),
                                  quantize_embeddings(cut, "int8", ranges=ranges[:, :16]))
    assert cut_ranges(ranges, None) is ranges
    with pytest.raises(ValueError, match="fewer than 65"):
        cut_ranges(ranges, 65)


def test_bytes_per_vector():
    assert [vector_bytes(384, p) for p in PRECISIONS] == [1536, 384, 384, 48, 48]
    assert [vector_bytes(1024, p) for p in PRECISIONS] == [4096, 1024, 1024, 128, 128]
    assert vector_bytes(37, "binary") == 5


def test_ranges_files_corpora_and_their_identity(tmp_path):
    ranges = calibration_ranges(normalized(np.random.default_rng(4), (50, 12)))
    np.save(tmp_path / "r.npy", ranges.astype(np.float64))
    loaded = load_ranges_file(tmp_path / "r.npy")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, ranges)
    kept = QuantizationRanges.from_array(loaded, "quantization_ranges: r.npy", ("quantization_ranges", "r.npy"))
    again = QuantizationRanges.from_array(ranges, "quantization_ranges: r.npy", ("quantization_ranges", "r.npy"))
    assert kept == again and kept.digest == again.digest and kept.digest.startswith("sha256:")
    np.testing.assert_array_equal(kept.array, ranges)
    moved = ranges.copy()
    moved[0, 0] -= 1e-3
    assert QuantizationRanges.from_array(moved, "x", ("quantization_ranges", "x")).digest != kept.digest
    (tmp_path / "bad.npy").write_text("not an array")
    with pytest.raises(ValueError, match="cannot be read as a .npy array"):
        load_ranges_file(tmp_path / "bad.npy")
    (tmp_path / "corpus.txt").write_text("one text\n\n  \nanother text\n")
    assert read_calibration_corpus(tmp_path / "corpus.txt") == ["one text", "another text"]
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="at least two texts"):
        read_calibration_corpus(tmp_path / "short.txt")
