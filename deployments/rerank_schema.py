"""The scoring routes' request and response models: TEI's ``/rerank`` and ``/predict``, and the
Cohere/Jina ``/v1/rerank`` and ``/v2/rerank`` (OpenAPI at ``/docs``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.schema import Text, prompt_field, prompt_name_field, truncation_direction_field
from embedder.indexer import TruncationDirection
from embedder.pair_windows import Aggregate


def _aggregate_field() -> Any:
    return Field("max", description="How a long document's windows make its score: the best window's (max, MaxP), "
                                    "the first's, or their mean.")


def _window_overlap_field() -> Any:
    return Field(None, ge=0, strict=True, description="Wordpieces consecutive windows of a long document share; a "
                                                      "quarter of a window when omitted.")


def _truncate_field() -> Any:
    return Field(False, strict=True, description="Cut a long pair as sentence-transformers' CrossEncoder.predict "
                                                 "does (longest_first) instead of reading the document in windows.")


class _ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    truncate: bool = _truncate_field()
    truncation_direction: TruncationDirection | None = truncation_direction_field()
    aggregate: Aggregate = _aggregate_field()
    window_overlap: int | None = _window_overlap_field()
    prompt_name: str | None = prompt_name_field()
    prompt: str | None = prompt_field()


class RerankRequest(_ScoreOptions):
    """``POST /rerank``, TEI's schema (and its extras: long documents in windows)."""

    model: str | None = Field(None, description="A served reranker or embedding model; the first one when omitted.")
    query: Text = Field(..., description="The query every text is scored against.")
    texts: list[Text] = Field(..., description="The texts to rank.")
    raw_scores: bool = Field(False, strict=True, description="The classifier's logits, without the activation.")
    return_text: bool = Field(False, strict=True, description="Give each text back with its score.")


class Window(BaseModel):
    start: int = Field(..., description="First character of the part of the text that gave the score.")
    end: int = Field(..., description="One past its last character (the whole text when it fit).")


class RankedText(BaseModel):
    index: int
    score: float
    text: str | None = None
    window: Window




class Document(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: Text


class CohereRerankRequest(_ScoreOptions):
    """``POST /v1/rerank`` and ``/v2/rerank``: Cohere's and Jina's schema. Fields of theirs that
    change nothing here (``max_tokens_per_doc``, ``rank_fields``...) are refused rather than ignored."""

    model: str | None = Field(None, description="A served reranker or embedding model; the first one when omitted.")
    query: Text
    documents: list[Text | Document] = Field(..., description='Strings, or objects with a "text".')
    top_n: int | None = Field(None, strict=True, ge=1, description="Only the best N; all when omitted.")
    return_documents: bool = Field(False, strict=True)


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: CohereDocument | None = None
    window: Window


class RerankUsage(BaseModel):
    total_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResult]
    usage: RerankUsage
    meta: dict[str, Any] = Field(default_factory=dict)


class PredictRequest(BaseModel):
    """``POST /predict``, TEI's schema: a text, a pair ``[text, text]``, or a list of either."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="A served classifier or reranker; the first one when omitted.")
    inputs: Text | list[Text] | list[list[Text]] = Field(
        ..., description='A text, a pair ["text", "text"], a list of texts or a list of pairs; as TEI reads it, '
                         "a list of exactly two strings is one pair.")
    raw_scores: bool = Field(False, strict=True, description="The logits, without the activation.")
    truncate: bool = Field(False, strict=True, description="Cut inputs longer than the model reads (else 413).")
    truncation_direction: TruncationDirection | None = truncation_direction_field()


class Prediction(BaseModel):
    score: float
    label: str


