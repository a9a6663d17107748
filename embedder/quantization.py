"""Quantized sentence vectors, as ``sentence_transformers.quantization.quantize_embeddings`` computes them.

``int8`` / ``uint8`` put each dimension's ``[min, max]`` range (``ranges``, shape
``[2, dim]``: the min row, then the max row) into 255 equal steps; a value's bucket
is ``floor((x - min) / step)`` clipped to ``[0, 255]`` (``int8`` then subtracts 128).
``binary`` / ``ubinary`` keep one bit per dimension (``x > 0``), packed eight to a byte
(``binary`` subtracts 128, as int8). Every vector is quantized on its own: nothing
here depends on the other vectors of a batch, and ranges are never taken from the
vectors being quantized (``calibration_ranges`` makes them from a separate corpus).

Pure numpy: no torch, no ray.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
#: Precisions that need per-dimension ranges.
RANGED_PRECISIONS = ("int8", "uint8")


def check_precision(precision: str) -> str:
    """``precision`` when it is one of ``PRECISIONS``, else ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def quantized_width(dim: int, precision: str) -> int:
    """Values per quantized vector: ``dim``, or ``ceil(dim / 8)`` bytes for the binary precisions."""
    check_precision(precision)
    return (dim + 7) // 8 if precision.endswith("binary") else dim


def quantized_dtype(precision: str) -> np.dtype:
    """The numpy dtype of a vector in ``precision``: float32, or int8/uint8 (the binary ones packed)."""
    check_precision(precision)
    if precision == "float32":
        return np.dtype(np.float32)
    return np.dtype(np.uint8 if precision.startswith("u") else np.int8)


def vector_bytes(dim: int, precision: str) -> int:
    """Bytes of one raw vector of ``dim`` dimensions in ``precision``."""
    return quantized_width(dim, precision) * quantized_dtype(precision).itemsize


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` (``[n, dim]`` or ``[dim]``, float) in ``precision``, exactly as
    ``quantize_embeddings(vectors, precision, ranges=ranges)``: float32 vectors as is, int8 /
    uint8 in ``ranges`` (``[2, dim]``, required: never calibrated on ``vectors`` themselves),
    binary / ubinary packed along the last axis."""
    check_precision(precision)
    vectors = np.asarray(vectors)
    if vectors.dtype in (np.int8, np.uint8):
        raise ValueError("vectors to quantize must be float, not already int8 or uint8")
    if precision == "float32":
        return vectors.astype(np.float32)
    if precision in RANGED_PRECISIONS:
        if ranges is None:
            raise ValueError(f"{precision} needs ranges of shape [2, dim] (each dimension's min and max)")
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        if ranges.ndim != 2 or ranges.shape != (2, vectors.shape[-1]):
            raise ValueError(f"ranges of shape {list(ranges.shape)} do not fit vectors of {vectors.shape[-1]} "
                             f"dimensions: they must be [2, {vectors.shape[-1]}]")
        # the same operations, in the same order and dtypes, as sentence-transformers' quantize_embeddings
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        if precision == "uint8":
            return buckets.astype(np.uint8)
        return (buckets - 128).astype(np.int8)
    packed = np.packbits(vectors > 0, axis=-1)
    return packed if precision == "ubinary" else (packed - 128).astype(np.int8)


def calibration_ranges(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension ``[min row, max row]`` of calibration vectors (``[n, dim]``, n >= 2), float32:
    what ``quantize_embeddings(..., calibration_embeddings=vectors)`` computes."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(f"calibration needs at least two vectors [n, dim], got shape {list(vectors.shape)}")
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)


def cut_ranges(ranges: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Ranges of the first ``dimensions`` dimensions (Matryoshka vectors cut to them)."""
    if dimensions is None or dimensions == ranges.shape[1]:
        return ranges
    if dimensions > ranges.shape[1]:
        raise ValueError(f"ranges cover {ranges.shape[1]} dimensions, fewer than {dimensions}")
    return np.ascontiguousarray(ranges[:, :dimensions])


def ranges_digest(ranges: np.ndarray) -> str:
    """``sha256:`` and the first 16 hex digits of the ranges as little-endian float32 bytes."""
    data = np.ascontiguousarray(ranges, dtype="<f4").tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class QuantizationRanges:
    """A model's int8 / uint8 ranges with where they came from. Compared (and pickled) by value:
    the float32 bytes, their digest, the source."""

    data: bytes
    dim: int
    source: str
    origin: tuple[str, str]  # (the config field, its value) that made them
    digest: str
    texts: int | None = None

    @classmethod
    def from_array(cls, ranges: np.ndarray, source: str, origin: tuple[str, str],
                   texts: int | None = None) -> QuantizationRanges:
        ranges = check_ranges(ranges, source)
        return cls(data=ranges.astype("<f4").tobytes(), dim=int(ranges.shape[1]), source=source, origin=origin,
                   digest=ranges_digest(ranges), texts=texts)

    @property
    def array(self) -> np.ndarray:
        """``[2, dim]`` float32 (read-only)."""
        return np.frombuffer(self.data, dtype="<f4").reshape(2, self.dim).astype(np.float32, copy=False)

    def card(self) -> dict:
        """What ``GET /models`` shows of them."""
        return {"source": self.source, "digest": self.digest, "dim": self.dim, "texts": self.texts}


def check_ranges(ranges: np.ndarray, where: str) -> np.ndarray:
    """``ranges`` as float32 ``[2, dim]``, finite; ``ValueError`` naming ``where`` otherwise."""
    ranges = np.asarray(ranges)
    if ranges.ndim != 2 or ranges.shape[0] != 2 or ranges.shape[1] < 1:
        raise ValueError(f"{where}: quantization ranges must have shape [2, dim] (the min row, the max row), "
                         f"not {list(ranges.shape)}")
    if not np.issubdtype(ranges.dtype, np.floating) and not np.issubdtype(ranges.dtype, np.integer):
        raise ValueError(f"{where}: quantization ranges must be numbers, not {ranges.dtype}")
    ranges = ranges.astype(np.float32)
    if not np.isfinite(ranges).all():
        raise ValueError(f"{where}: quantization ranges hold NaN or infinite values")
    if (ranges[1] < ranges[0]).any():
        raise ValueError(f"{where}: quantization ranges have a max below the min in "
                         f"{int((ranges[1] < ranges[0]).sum())} dimensions (row 0 is the min, row 1 the max)")
    return ranges


def load_ranges_file(path: str | Path) -> np.ndarray:
    """A ``.npy`` file of shape ``[2, dim]`` as float32 (``np.load`` without pickles)."""
    try:
        ranges = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"quantization_ranges {str(path)!r} cannot be read as a .npy array: {error}") from None
    return check_ranges(ranges, f"quantization_ranges {str(path)!r}")


def read_calibration_corpus(path: str | Path) -> list[str]:
    """The texts of a calibration corpus: one per line, blank lines skipped (at least two)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"calibration_corpus {str(path)!r} cannot be read: {error}") from None
    texts = [line for line in lines if line.strip()]
    if len(texts) < 2:
        raise ValueError(f"calibration_corpus {str(path)!r} has {len(texts)} non-blank lines; ranges need at "
                         "least two texts (sentence-transformers advises a representative corpus, 100 or more)")
    return texts
