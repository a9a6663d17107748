"""``SparsePipeline``: sparse (SPLADE) embedding requests, and their handle API.

A sparse encoder (a sentence-transformers ``SparseEncoder`` folder) encodes through its encoder
deployment's sparse head: the replica folds the texts, runs the masked-LM in token-bounded
sub-batches with other requests' texts, and gives back only each vector's non-zeros.
"""

from __future__ import annotations

from typing import Any

from deployments.cost import check_sparse_answer, text_cost
from deployments.protocol import SparseRequest, SparseResult
from deployments.scoring_pipeline import ScoringPipeline
from deployments.sparse_schema import EmbedSparseRequest
from deployments.validation import check_texts, parse_request
from embedder.sparse_encoder import task_prompt_name

class SparsePipeline(ScoringPipeline):
    """The scoring pipeline, plus sparse embeddings (``/embed_sparse``)."""

    async def sparse_request(self, body: EmbedSparseRequest, route: str) -> tuple[int, SparseResult]:
        """The model's vocabulary size and each text's sparse vector."""
        name = self._model(body.model, ("sparse",), route)
        texts = check_texts(body.inputs, self._limits)
        prompt_name = task_prompt_name(self._configs[name].prompts or {}, body.task, body.prompt_name, body.prompt)
        request = SparseRequest(model=name, texts=texts, truncate=body.truncate,
                                truncation_direction=body.truncation_direction,
                                prompt=self._prompt(name, prompt_name, body.prompt) or "", task=body.task,
                                max_active_dims=body.max_active_dims, return_tokens=body.return_tokens,
                                max_tokens=self._limits.max_wordpieces_per_request)
        self._check_cost(text_cost(list(map(len, texts)), joined=len(request.prompt), vectors=len(texts),
                                   width=2 * (body.max_active_dims or 0)))
        result = await self._call_model(name, route, lambda: self._encoders[name].embed_sparse.remote(request),
                                        request.num_chars)
        check_sparse_answer(sum(len(indices) for indices, _ in result.rows), len(result.rows), body.return_tokens,
                            self._limits)
        return (await self._model_info(name))["dim"], result

    async def embed_sparse_texts(self, texts: Any, model: str | None = None, truncate: bool = False,
                                 truncation_direction: str | None = None, prompt_name: str | None = None,
                                 prompt: str | None = None, task: str | None = None,
                                 max_active_dims: int | None = None) -> tuple[int, SparseResult]:
        """``POST /embed_sparse`` by handle."""
        body = parse_request(EmbedSparseRequest, inputs=texts, model=model, truncate=truncate,
                             truncation_direction=truncation_direction, prompt_name=prompt_name, prompt=prompt,
                             task=task, max_active_dims=max_active_dims)
        return await self.sparse_request(body, "handle")
