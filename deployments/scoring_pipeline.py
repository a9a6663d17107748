"""``ScoringPipeline``: reranking and classification requests, and their handle API.

A reranker or classifier (a sentence-transformers ``CrossEncoder`` folder) scores through its
encoder deployment's pair head: the replica tokenizes the pairs, reads a long document in
windows beside the whole query, batches the windows with other requests' by tokens, and gives
back each document's score with the character span it comes from. An embedding model reranks by
the cosine of the query's and each text's vectors, each folded as ``/embed`` folds it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from deployments.cost import text_cost
from deployments.errors import BadRequestError
from deployments.pipeline import EmbeddingPipeline
from deployments.protocol import Ranked, ScoreRequest, ScoreResult
from deployments.rerank_schema import CohereRerankRequest, Document, PredictRequest, RerankRequest
from deployments.validation import check_pairs, check_texts, parse_request, text_problem

#: The kinds each request answers.
RERANKING_KINDS = ("reranker", "embedding")
PREDICTING_KINDS = ("classifier", "reranker")


class ScoringPipeline(EmbeddingPipeline):
    """The embedding pipeline, plus reranking (``/rerank``, ``/v1/rerank``, ``/v2/rerank``) and
    classification (``/predict``)."""

    async def _score(self, request: ScoreRequest, route: str) -> ScoreResult:
        return await self._call_model(request.model, route, lambda: self._encoders[request.model].score.remote(request),
                                      request.num_chars)

    def _score_options(self, name: str, body: RerankRequest | CohereRerankRequest | PredictRequest) -> dict[str, Any]:
        """The ``ScoreRequest`` fields a body sets, checked against the model and the limits."""
        if body.truncation_direction == "left":
            raise BadRequestError(f"model {name!r}: truncation_direction 'left' is not supported for "
                                  "cross-encoders (sentence-transformers cuts pairs longest_first from the right)")
        return {"model": name, "truncate": body.truncate, "max_windows": self._limits.max_chunks_per_request,
                "max_tokens": self._limits.max_wordpieces_per_request}

    async def rerank_request(self, body: RerankRequest | CohereRerankRequest, route: str,
                             raw_scores: bool = False) -> tuple[str, list[Ranked], int]:
        """The model's name, every document ranked best first, and the tokens scored."""
        name = self._model(body.model, RERANKING_KINDS, route)
        if (problem := text_problem(body.query)) is not None:
            raise BadRequestError(f"query {problem}")
        texts = body.texts if isinstance(body, RerankRequest) else [
            document.text if isinstance(document, Document) else document for document in body.documents]
        documents = check_texts(texts, self._limits, "texts" if isinstance(body, RerankRequest) else "documents")
        echoed = sum(map(len, documents)) if getattr(body, "return_text", False) or getattr(
            body, "return_documents", False) else 0
        if self._configs[name].kind == "embedding":
            # the query is embedded once: each of the two embedding calls counts its own cost too
            self._check_cost(text_cost([len(body.query), *map(len, documents)], vectors=len(documents),
                                       echoed_chars=echoed))
            scores, tokens = await self._cosine_scores(name, body, documents, route)
            spans = [(0, len(document)) for document in documents]
        else:
            prompt = self._prompt(name, body.prompt_name, body.prompt) or ""
            self._check_cost(text_cost(list(map(len, documents)), joined=len(prompt) + len(body.query),
                                       vectors=len(documents), echoed_chars=echoed))
            result = await self._score(ScoreRequest(
                pairs=[(body.query, document) for document in documents], aggregate=body.aggregate,
                window_overlap=body.window_overlap, prompt=prompt,
                activate=not raw_scores, **self._score_options(name, body)), route)
            scores = [score.score for score in result.scores]
            spans = [(score.start, score.end) for score in result.scores]
            tokens = result.num_tokens
        order = sorted(range(len(documents)), key=lambda index: -scores[index])
        return name, [Ranked(index, float(scores[index]), *spans[index]) for index in order], tokens

    async def _cosine_scores(self, name: str, body: RerankRequest | CohereRerankRequest, documents: list[str],
                             route: str) -> tuple[list[float], int]:
        """Cosine similarities of the query's vector to each document's, and the wordpieces embedded.
        The query takes the request's prompt, else the model's ``query`` prompt if it has one; the
        documents the model's ``document`` prompt if it has one (``encode_query`` / ``encode_document``)."""
        if body.aggregate != "max" or body.window_overlap is not None:
            raise BadRequestError(f"model {name!r} is an embedding model: it reranks by cosine over whole texts "
                                  "(folded as /embed folds them), so aggregate and window_overlap do not apply")
        prompts = self._configs[name].prompts or {}
        query_prompt = body.prompt_name or (None if body.prompt is not None or "query" not in prompts else "query")
        document_prompt = "document" if "document" in prompts else None
        (query, query_counts), (vectors, counts) = await asyncio.gather(
            self.pooled_vectors(name, texts=[body.query], prompt_name=query_prompt, prompt=body.prompt,
                                normalize=True, truncate=body.truncate,
                                truncation_direction=body.truncation_direction, route=route),
            self.pooled_vectors(name, texts=documents, prompt_name=document_prompt, normalize=True,
                                truncate=body.truncate, truncation_direction=body.truncation_direction, route=route))
        cosine = vectors.astype(np.float64) @ query[0].astype(np.float64)
        return cosine.tolist(), int(query_counts.sum() + counts.sum())

    async def predict_request(self, body: PredictRequest, route: str) -> tuple[bool, list[list[tuple[str, float]]]]:
        """Whether one input was sent (not a list), and per input its ``(label, score)`` pairs,
        best first: TEI's reading of ``inputs`` (a list of exactly two strings is one pair)."""
        name = self._model(body.model, PREDICTING_KINDS, route)
        inputs = body.inputs
        single = isinstance(inputs, str) or (len(inputs) == 2 and all(isinstance(text, str) for text in inputs))
        if isinstance(inputs, str):
            texts, pairs = [inputs], None
        elif single:
            texts, pairs = None, [tuple(inputs)]
        elif inputs and isinstance(inputs[0], list):
            bad = [index for index, pair in enumerate(inputs) if len(pair) != 2]
            if bad:
                raise BadRequestError(f"inputs[{bad[0]}] has {len(inputs[bad[0]])} texts; a list in inputs must be "
                                      "a pair of two texts")
            texts, pairs = None, [tuple(pair) for pair in inputs]
        else:
            texts, pairs = inputs, None
        if texts is not None:
            texts = check_texts(texts, self._limits, "inputs")
        else:
            pairs = check_pairs(pairs, self._limits)
        info = await self._model_info(name)
        self._check_cost(text_cost([len(text) for text in texts] if texts is not None else
                                   [len(a) + len(b) for a, b in pairs],
                                   vectors=len(texts or pairs), width=2 * len(info["labels"])))
        softmax = not body.raw_scores and info["activation_is_default"] and len(info["labels"]) > 1
        result = await self._score(ScoreRequest(texts=texts, pairs=pairs, windows=False, activate=not body.raw_scores,
                                                apply_softmax=softmax, **self._score_options(name, body)), route)
        predictions = []
        for score in result.scores:
            values = np.atleast_1d(np.asarray(score.score, dtype=np.float64))
            ranked = sorted(zip(info["labels"], values.tolist()), key=lambda entry: -entry[1])
            predictions.append(ranked)
        return single, predictions

    # --- the handle API: the same request models as the routes ----------------------

    async def rerank_documents(self, query: Any, documents: Any, model: str | None = None, top_n: int | None = None,
                               aggregate: str = "max", truncate: bool = False, window_overlap: int | None = None,
                               raw_scores: bool = False, prompt_name: str | None = None,
                               prompt: str | None = None) -> list[Ranked]:
        """``POST /rerank`` by handle: the documents best first, the ``top_n`` best when given."""
        body = parse_request(RerankRequest, query=query, texts=documents, model=model, aggregate=aggregate,
                             truncate=truncate, window_overlap=window_overlap, raw_scores=raw_scores,
                             prompt_name=prompt_name, prompt=prompt)
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise BadRequestError(f"top_n must be a positive integer, not {top_n!r}")
        _, ranked, _ = await self.rerank_request(body, "handle", raw_scores=raw_scores)
        return ranked[:top_n]

    async def predict_inputs(self, inputs: Any, model: str | None = None, raw_scores: bool = False,
                             truncate: bool = False) -> list[list[tuple[str, float]]]:
        """``POST /predict`` by handle: per input (a text or a pair), its ``(label, score)`` pairs best first."""
        body = parse_request(PredictRequest, inputs=inputs, model=model, raw_scores=raw_scores, truncate=truncate)
        return (await self.predict_request(body, "handle"))[1]
