"""``POST /embed_sparse``'s request and response models (TEI's schema, with sentence-transformers'
``max_active_dims`` and the route of inference-free models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.schema import Text, prompt_field, prompt_name_field, truncate_field, truncation_direction_field
from embedder.indexer import TruncationDirection


class EmbedSparseRequest(BaseModel):
    """``POST /embed_sparse``: one sparse (SPLADE) vector per text."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    inputs: Text | list[Text] = Field(..., description="A text or a list of texts.")
    model: str | None = Field(None, description="A served sparse model; the first one when omitted.")
    truncate: bool = truncate_field()
    truncation_direction: TruncationDirection | None = truncation_direction_field()
    prompt_name: str | None = prompt_name_field()
    prompt: str | None = prompt_field()
    task: Literal["query", "document"] | None = Field(
        None, description="encode_query / encode_document: the route of an inference-free model (its default when "
                          "omitted) and the query/document prompt when no prompt is named.")
    max_active_dims: int | None = Field(None, ge=1, strict=True, description="Keep the k largest dimensions "
                                                                             "(sentence-transformers' argument).")
    return_tokens: bool = Field(False, strict=True, description="Give each dimension's token (SparseEncoder.decode).")


class SparseValue(BaseModel):
    index: int
    value: float
    token: str | None = None
