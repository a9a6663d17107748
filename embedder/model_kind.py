"""What kind of model a folder holds, read from the folder as sentence-transformers reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from embedder.cross_encoder import read_cross_encoder_folder
from embedder.sentence_folder import read_json
from embedder.sparse_encoder import is_sparse_encoder_folder

#: embedding: a SentenceTransformer (or any transformer, pooled); reranker: a one-label CrossEncoder,
#: scoring (query, document) pairs; classifier: a CrossEncoder with several labels; sparse: a
#: SparseEncoder (SPLADE).
ModelKind = Literal["embedding", "reranker", "classifier", "sparse"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)


def is_cross_encoder_folder(model_name: str | Path) -> bool:
    """Whether sentence-transformers would load the folder as a ``CrossEncoder``: saved by it as one
    (``model_type: CrossEncoder``), or a plain ``*ForSequenceClassification`` folder."""
    model_name = str(model_name)
    if read_json(model_name, "modules.json") is not None:
        settings = read_json(model_name, "config_sentence_transformers.json") or {}
        return settings.get("model_type") == "CrossEncoder"
    config = read_json(model_name, "config.json")
    architectures = config.get("architectures") or [] if isinstance(config, dict) else []
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def read_model_kind(model_name: str | Path) -> ModelKind:
    """The folder's kind: a SparseEncoder is sparse; a cross-encoder with one label is a reranker,
    with more a classifier; anything else is served as an embedding model."""
    if is_sparse_encoder_folder(model_name):
        return "sparse"
    if not is_cross_encoder_folder(model_name):
        return "embedding"
    return "reranker" if read_cross_encoder_folder(model_name).num_labels == 1 else "classifier"
