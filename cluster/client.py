"""``EmbeddingClient``: the running cluster from Python, through the app's Ray Serve handle."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import scipy.sparse
from ray import serve
from ray.serve.handle import DeploymentResponse

from cluster.ray_connect import join_ray
from deployments.errors import EmbeddingRequestError, cause_of
from deployments.protocol import Ranked


def _raise_cause(error: BaseException) -> None:
    """Re-raise what the cluster raised (``BadRequestError``, ``UnknownModelError``, ...)
    without Ray's wrapping."""
    cause = cause_of(error)
    if isinstance(cause, EmbeddingRequestError):
        raise type(cause)(cause.message) from None
    raise error


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document: ``text == document[start:end]``, its wordpieces, its vector."""

    start: int
    end: int
    text: str
    num_tokens: int
    vector: np.ndarray


def _chunks(texts: str | list[str], answer: tuple[list[np.ndarray], list[np.ndarray], int]) -> list[list[Chunk]]:
    tables, vectors, _ = answer
    documents = [texts] if isinstance(texts, str) else texts
    return [[Chunk(start, end, document[start:end], count, vector)
             for (start, end, count), vector in zip(table.tolist(), document_vectors)]
            for document, table, document_vectors in zip(documents, tables, vectors)]


def _call_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """A method's arguments (its ``locals()``), as the handle method of the same name takes them."""
    return {key: value for key, value in arguments.items() if key != "self"}


def _csr(dim: int, result: Any) -> scipy.sparse.csr_matrix:
    """The rows of a sparse answer as one CSR matrix ``[inputs, dim]``."""
    indptr = np.cumsum([0] + [len(indices) for indices, _ in result.rows])
    indices = np.concatenate([i for i, _ in result.rows]) if result.rows else np.zeros(0, np.int32)
    values = np.concatenate([v for _, v in result.rows]) if result.rows else np.zeros(0, np.float32)
    return scipy.sparse.csr_matrix((values, indices, indptr), shape=(len(result.rows), dim))


class EmbeddingClient:
    """Calls a running cluster's app by handle: no HTTP, no JSON, numpy in and out.

    Joins the Ray cluster at ``address`` (default: the one this machine runs,
    ``"auto"``) unless this process is connected already. ``timeout_s`` bounds every
    call (``TimeoutError`` past it; ``None``: no bound).
    """

    def __init__(self, address: str | None = None, app_name: str = "embeddings",
                 timeout_s: float | None = None) -> None:
        if not ray.is_initialized():
            join_ray(address or "auto", log_to_driver=False)
        self._handle = serve.get_app_handle(app_name)
        self._timeout_s = timeout_s

    def _call(self, method: str, **kwargs: Any) -> DeploymentResponse:
        return getattr(self._handle, method).remote(**kwargs)

    def _result(self, response: DeploymentResponse) -> Any:
        try:
            return response.result(timeout_s=self._timeout_s)
        except TimeoutError:
            response.cancel()
            raise TimeoutError(f"the cluster did not answer within {self._timeout_s} s") from None
        except Exception as error:
            _raise_cause(error)

    async def _aresult(self, response: DeploymentResponse) -> Any:
        try:
            return await asyncio.wait_for(response, timeout=self._timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise TimeoutError(f"the cluster did not answer within {self._timeout_s} s") from None
        except Exception as error:
            _raise_cause(error)

    # --- blocking -------------------------------------------------------------

    def embed(self, texts: str | list[str] | None = None, model: str | None = None,
              pooling: str | list[str] | None = None, normalize: bool | None = None, truncate: bool = False,
              dimensions: int | None = None, pairs: list[tuple[str, str]] | None = None,
              prompt_name: str | None = None, prompt: str | None = None,
              truncation_direction: str | None = None, precision: str = "float32") -> np.ndarray:
        """One pooled vector per text (or per sentence pair): ``[n, dim]`` float32, as
        ``SentenceTransformer.encode(texts, prompt_name=..., prompt=...)`` gives them; with ``precision``
        ``int8``/``uint8`` (``[n, dim]``, in the model's ranges) or ``binary``/``ubinary`` (``[n, ceil(dim/8)]``),
        as ``quantize_embeddings`` quantizes them."""
        return self._result(self._call("embed_texts", texts=texts, model=model, pooling=pooling,
                                       normalize=normalize, truncate=truncate, dimensions=dimensions,
                                       pairs=pairs, prompt_name=prompt_name, prompt=prompt,
                                       truncation_direction=truncation_direction, precision=precision))[0]

    def embed_tokens(self, texts: str | list[str] | None = None, words: list[list[str]] | None = None,
                     model: str | None = None, level: str = "wordpiece", sub_token_mode: str = "avg",
                     truncate: bool = False, prompt_name: str | None = None, prompt: str | None = None,
                     truncation_direction: str | None = None) -> list[np.ndarray]:
        """Per input, one vector per wordpiece (``level="wordpiece"``) or per word (``"word"``)."""
        return self._result(self._call("embed_token_vectors", texts=texts, words=words, model=model, level=level,
                                       sub_token_mode=sub_token_mode, truncate=truncate, prompt_name=prompt_name,
                                       prompt=prompt, truncation_direction=truncation_direction))[0]

    def tokenize(self, texts: str | list[str] | None = None, words: list[list[str]] | None = None,
                 model: str | None = None, truncate: bool = False, prompt_name: str | None = None,
                 prompt: str | None = None, truncation_direction: str | None = None) -> list[dict]:
        """Per input: its wordpieces, ids, number of segments (and word offsets for words)."""
        return self._result(self._call("tokenize_inputs", texts=texts, words=words, model=model, truncate=truncate,
                                       prompt_name=prompt_name, prompt=prompt,
                                       truncation_direction=truncation_direction))

    def embed_chunks(self, texts: str | list[str], model: str | None = None, chunk_size: int = 128,
                     chunk_overlap: int = 0, spans: list[list[tuple[int, int]]] | None = None,
                     context: str = "document", pooling: str | None = None, normalize: bool | None = None,
                     dimensions: int | None = None, prompt_name: str | None = None,
                     prompt: str | None = None, precision: str = "float32") -> list[list[Chunk]]:
        """Per document, its chunks with their vectors: late chunking (``context="document"``, each
        chunk pooled from the whole document's encoding) or each chunk alone (``"chunk"``); vectors
        in ``precision`` as ``embed``'s."""
        return _chunks(texts, self._result(self._call(
            "embed_document_chunks", texts=texts, model=model, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
            spans=spans, context=context, pooling=pooling, normalize=normalize, dimensions=dimensions,
            prompt_name=prompt_name, prompt=prompt, precision=precision)))

    def rerank(self, query: str, documents: list[str], model: str | None = None, top_n: int | None = None,
               aggregate: str = "max", truncate: bool = False, window_overlap: int | None = None,
               raw_scores: bool = False, prompt_name: str | None = None, prompt: str | None = None) -> list[Ranked]:
        """The documents best first (the ``top_n`` best), each a ``Ranked(index, score, start, end)``:
        ``CrossEncoder.rank``'s scores for a reranker, a long document scored by its best window
        (``aggregate``) and ``start``/``end`` the characters that scored; cosine for an embedding model."""
        return self._result(self._call("rerank_documents", **_call_arguments(locals())))

    def predict(self, inputs: str | list[str] | list[list[str]], model: str | None = None, raw_scores: bool = False,
                truncate: bool = False) -> list[list[tuple[str, float]]]:
        """Per input (a text, or a ``[text, text]`` pair; a list of exactly two strings is one pair,
        as TEI reads it), each label with its score, best first."""
        return self._result(self._call("predict_inputs", inputs=inputs, model=model, raw_scores=raw_scores,
                                       truncate=truncate))

    def embed_sparse(self, texts: str | list[str], model: str | None = None, truncate: bool = False,
                     truncation_direction: str | None = None, prompt_name: str | None = None,
                     prompt: str | None = None, task: str | None = None,
                     max_active_dims: int | None = None) -> scipy.sparse.csr_matrix:
        """Sparse (SPLADE) vectors, ``[n, vocabulary]`` float32, as ``SparseEncoder.encode`` (``task``
        ``"query"``/``"document"``: ``encode_query`` / ``encode_document``)."""
        return _csr(*self._result(self._call("embed_sparse_texts", **_call_arguments(locals()))))

    def models(self) -> list[dict]:
        """The served models and their settings."""
        return self._result(self._call("list_models"))

    # --- async twins ----------------------------------------------------------

    async def aembed(self, texts: str | list[str] | None = None, model: str | None = None,
                     pooling: str | list[str] | None = None, normalize: bool | None = None, truncate: bool = False,
                     dimensions: int | None = None, pairs: list[tuple[str, str]] | None = None,
                     prompt_name: str | None = None, prompt: str | None = None,
                     truncation_direction: str | None = None, precision: str = "float32") -> np.ndarray:
        return (await self._aresult(self._call("embed_texts", texts=texts, model=model, pooling=pooling,
                                               normalize=normalize, truncate=truncate, dimensions=dimensions,
                                               pairs=pairs, prompt_name=prompt_name, prompt=prompt,
                                               truncation_direction=truncation_direction,
                                               precision=precision)))[0]

    async def aembed_tokens(self, texts: str | list[str] | None = None, words: list[list[str]] | None = None,
                            model: str | None = None, level: str = "wordpiece", sub_token_mode: str = "avg",
                            truncate: bool = False, prompt_name: str | None = None, prompt: str | None = None,
                            truncation_direction: str | None = None) -> list[np.ndarray]:
        return (await self._aresult(self._call("embed_token_vectors", texts=texts, words=words, model=model,
                                               level=level, sub_token_mode=sub_token_mode, truncate=truncate,
                                               prompt_name=prompt_name, prompt=prompt,
                                               truncation_direction=truncation_direction)))[0]

    async def atokenize(self, texts: str | list[str] | None = None, words: list[list[str]] | None = None,
                        model: str | None = None, truncate: bool = False, prompt_name: str | None = None,
                        prompt: str | None = None, truncation_direction: str | None = None) -> list[dict]:
        return await self._aresult(self._call("tokenize_inputs", texts=texts, words=words, model=model,
                                              truncate=truncate, prompt_name=prompt_name, prompt=prompt,
                                              truncation_direction=truncation_direction))

    async def aembed_chunks(self, texts: str | list[str], model: str | None = None, chunk_size: int = 128,
                            chunk_overlap: int = 0, spans: list[list[tuple[int, int]]] | None = None,
                            context: str = "document", pooling: str | None = None, normalize: bool | None = None,
                            dimensions: int | None = None, prompt_name: str | None = None,
                            prompt: str | None = None, precision: str = "float32") -> list[list[Chunk]]:
        return _chunks(texts, await self._aresult(self._call(
            "embed_document_chunks", texts=texts, model=model, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
            spans=spans, context=context, pooling=pooling, normalize=normalize, dimensions=dimensions,
            prompt_name=prompt_name, prompt=prompt, precision=precision)))

    async def arerank(self, query: str, documents: list[str], model: str | None = None, top_n: int | None = None,
                      aggregate: str = "max", truncate: bool = False, window_overlap: int | None = None,
                      raw_scores: bool = False, prompt_name: str | None = None,
                      prompt: str | None = None) -> list[Ranked]:
        """``rerank``, awaitable."""
        return await self._aresult(self._call("rerank_documents", **_call_arguments(locals())))

    async def apredict(self, inputs: str | list[str] | list[list[str]], model: str | None = None,
                       raw_scores: bool = False, truncate: bool = False) -> list[list[tuple[str, float]]]:
        """``predict``, awaitable."""
        return await self._aresult(self._call("predict_inputs", inputs=inputs, model=model, raw_scores=raw_scores,
                                              truncate=truncate))

    async def aembed_sparse(self, texts: str | list[str], model: str | None = None, truncate: bool = False,
                            truncation_direction: str | None = None, prompt_name: str | None = None,
                            prompt: str | None = None, task: str | None = None,
                            max_active_dims: int | None = None) -> scipy.sparse.csr_matrix:
        """``embed_sparse``, awaitable."""
        return _csr(*await self._aresult(self._call("embed_sparse_texts", **_call_arguments(locals()))))

    async def amodels(self) -> list[dict]:
        return await self._aresult(self._call("list_models"))
