"""The HTTP API's request and response models (OpenAPI at ``/docs``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from embedder.chunking import ChunkContext
from embedder.indexer import TruncationDirection
from embedder.model_kind import ModelKind
from embedder.quantization import Precision
from embedder.sentence_pooling import PoolingMode as Pooling
from embedder.word_pooling import SubTokenMode



def prompt_name_field() -> Any:
    return Field(None, description="A key of the model's prompts (GET /models lists them); the model's default "
                                   "prompt when omitted, as in sentence-transformers.")


def prompt_field() -> Any:
    return Field(None, description="A literal prompt put before each text instead of a named one.")


def truncation_direction_field() -> Any:
    return Field(None, description="With truncate: keep the first wordpieces (right, cutting the end) or the last "
                                   "ones (left); the tokenizer's side when omitted.")


def truncate_field() -> Any:
    return Field(False, strict=True, description="Keep only max_length wordpieces of long inputs instead of "
                                                 "folding (pairs: longest_first, as sentence-transformers).")


def normalize_field() -> Any:
    return Field(None, strict=True, description="L2-normalize; the model's default when omitted.")


def dimensions_field() -> Any:
    return Field(None, ge=1, strict=True, description="Keep the first N dimensions (Matryoshka).")


def precision_field() -> Any:
    return Field("float32", description="float32, or quantized as sentence-transformers' quantize_embeddings "
                                        "(after dimensions and normalization): int8/uint8 (one byte per dimension, "
                                        "in the model's configured ranges; GET /models shows them), binary/ubinary "
                                        "(one bit per dimension, packed: ceil(dim/8) bytes, as int8/uint8). "
                                        "Quantized vectors are lists of integers.")


#: A token id: an integer, never a boolean.
TokenId = Annotated[int, Field(strict=True, ge=0)]
#: A text: a string, never bytes or a number turned into one (the handle's arguments pass here too).
Text = Annotated[str, Field(strict=True)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --- OpenAI-compatible ------------------------------------------------------

class OpenAIEmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``, OpenAI's schema. Unknown fields are ignored, as OpenAI's server does."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    input: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        ..., description="A text or a list of texts; or the served model's own token ids (a list of ids, or a "
                         "list of such lists), as its tokenizer gives them, special tokens included. Not tiktoken's "
                         "ids: LangChain's OpenAIEmbeddings needs check_embedding_ctx_length=False.")
    model: str | None = Field(None, description="A served model; the first one when omitted.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, strict=True, description="Keep the first N dimensions "
                                                                         "(re-normalized).")
    user: str | None = None
    prompt_name: str | None = prompt_name_field()
    prompt: str | None = prompt_field()
    precision: Precision = Field(
        "float32", description="An extra field (the openai client's extra_body): float32, int8, uint8, binary or "
                               "ubinary, as on /embed. With encoding_format base64 the quantized bytes are base64'd "
                               "(one byte per value: decode with numpy's int8 or uint8, not float32).")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | list[int] | str
    index: int


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


# --- native routes ----------------------------------------------------------

class _TextsOrWords(_Request):
    inputs: Text | list[Text] | None = Field(None, description="A text or a list of texts.")
    words: list[list[Text]] | None = Field(None, description="Pre-split words, a list per input.")
    model: str | None = Field(None, description="A served model; the first one when omitted.")
    truncate: bool = truncate_field()
    truncation_direction: TruncationDirection | None = truncation_direction_field()
    prompt_name: str | None = prompt_name_field()
    prompt: str | None = prompt_field()

    @model_validator(mode="after")
    def _one_kind_of_input(self):
        if (self.inputs is None) == (self.words is None):
            raise ValueError("give exactly one of 'inputs' or 'words'")
        return self


class EmbedRequest(_Request):
    """``POST /embed``: one pooled vector per text (or per sentence pair)."""

    inputs: Text | list[Text] | None = Field(None, description="A text or a list of texts.")
    pairs: list[tuple[Text, Text]] | None = Field(
        None, description="Sentence pairs instead of texts, encoded with the tokenizer's pair template "
                          "(type ids 0 and 1).")
    model: str | None = Field(None, description="A served model; the first one when omitted.")
    pooling: Pooling | list[Pooling] | None = Field(
        None, description="A pooling mode (or several, concatenated); the model's own when omitted.")
    normalize: bool | None = normalize_field()
    truncate: bool = truncate_field()
    truncation_direction: TruncationDirection | None = truncation_direction_field()
    dimensions: int | None = dimensions_field()
    prompt_name: str | None = prompt_name_field()
    prompt: str | None = prompt_field()
    precision: Precision = precision_field()

    @model_validator(mode="after")
    def _texts_or_pairs(self):
        if (self.inputs is None) == (self.pairs is None):
            raise ValueError("give exactly one of 'inputs' or 'pairs'")
        return self


class EmbedChunksRequest(_Request):
    """``POST /embed_chunks``: documents -> chunk vectors with character offsets."""

    inputs: Text | list[Text] = Field(..., description="A document or a list of documents.")
    model: str | None = Field(None, description="A served model; the first one when omitted.")
    chunk_size: int = Field(128, ge=1, strict=True, description="Most wordpieces in a chunk; chunks end between "
                                                                "words (a longer word is a chunk of its own).")
    chunk_overlap: int = Field(0, ge=0, strict=True, description="Wordpieces a chunk shares with the previous one "
                                                                 "(less than chunk_size).")
    spans: list[list[tuple[int, int]]] | None = Field(
        None, description="Per document, your own [start, end) character spans instead of chunk_size.")
    context: ChunkContext = Field(
        "document", description="document: late chunking, each chunk pooled from its whole document's "
                                "encoding; chunk: each chunk's text embedded alone, as /embed would.")
    pooling: Pooling | list[Pooling] | None = Field(
        None, description="Late chunking needs mean pooling: set 'mean' for a model that pools otherwise.")
    normalize: bool | None = normalize_field()
    dimensions: int | None = dimensions_field()
    prompt_name: str | None = prompt_name_field()
    prompt: str | None = prompt_field()
    precision: Precision = precision_field()


class Chunk(BaseModel):
    start: int = Field(..., description="First character of the chunk in its document.")
    end: int = Field(..., description="One past its last character: text == document[start:end].")
    text: str
    num_tokens: int = Field(..., description="Its wordpieces.")
    embedding: list[float] | list[int]


class DocumentChunks(BaseModel):
    index: int
    chunks: list[Chunk]


class EmbedChunksResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    usage: OpenAIUsage
    data: list[DocumentChunks]


class EmbedResponse(RootModel[list[list[float]] | list[list[int]]]):
    """One vector per input, in input order (integers for a quantized precision)."""


class EmbedTokensRequest(_TextsOrWords):
    """``POST /embed_tokens``: one vector per wordpiece, or per word."""

    level: Literal["wordpiece", "word"] = "wordpiece"
    sub_token_mode: SubTokenMode = Field("avg", description="How a word pools its wordpieces.")

    @model_validator(mode="after")
    def _words_for_word_level(self):
        if self.level == "word" and self.words is None:
            raise ValueError("level 'word' needs pre-split 'words'")
        return self


class TokenVectors(BaseModel):
    tokens: list[str] = Field(..., description="The wordpieces (or the words), one per vector.")
    embeddings: list[list[float]]


class EmbedTokensResponse(RootModel[list[TokenVectors]]):
    """Per input: its tokens and one vector per token."""


class TokenizeRequest(_TextsOrWords):
    """``POST /tokenize``: the wordpieces and segments the encoder would see."""


class Tokenized(BaseModel):
    tokens: list[str] = Field(..., description="Wordpieces of the unfolded sequence, specials included.")
    ids: list[int]
    num_segments: int
    word_offsets: list[tuple[int, int]] | None = Field(
        None, description="Inclusive wordpiece span per word; (-1, -1) for a word with none.")
    prompt_length: int | None = Field(None, description="Leading tokens that belong to the prompt (start tokens "
                                                        "included), when a prompt applies.")


class TokenizeResponse(RootModel[list[Tokenized]]):
    """One entry per input."""


class QuantizationRangesCard(BaseModel):
    source: str = Field(..., description="quantization_ranges: FILE, or calibration_corpus: FILE (embedded at "
                                         "start-up, float32 on the CPU).")
    digest: str = Field(..., description="sha256 of the [2, dim] ranges as little-endian float32 bytes (16 digits).")
    dim: int
    texts: int | None = Field(None, description="The calibration corpus's texts.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(..., description="When the ingress started serving it (Unix seconds), as OpenAI's field.")
    owned_by: str = "embedding-cluster"
    kind: ModelKind = Field(
        ..., description="What the folder holds: an embedding model (/embed...), a reranker (/rerank, /predict), a "
                         "classifier (/predict) or a sparse encoder (/embed_sparse).")
    model_name: str
    dtype: str = Field(..., description="The replicas' dtype, or 'mixed' (then see dtypes).")
    dtypes: list[str] = Field(default_factory=list, description="Every dtype the replicas asked answered (each "
                                                                 "decides on its own node: bf16 needs native support).")
    device: str = Field(..., description="cpu, cuda, or 'mixed' (then see devices).")
    devices: list[str] = Field(default_factory=list)
    max_length: int = Field(..., description="Tokens per segment: longer inputs are folded, read in windows, or "
                                             "truncated.")
    layers: int
    prompts: dict[str, str]
    default_prompt_name: str | None
    dim: int | None = Field(None, description="Embedding models: the sentence vector's dimension (after any Dense "
                                              "module); sparse models: the vocabulary's size.")
    wordpiece_dim: int | None = Field(None, description="Embedding models: the dimension of /embed_tokens vectors.")
    last_layer_only: bool | None = None
    pooling: list[Pooling] | None = None
    include_prompt: bool | None = Field(None, description="Whether prompt tokens count in the pooling.")
    normalize: bool | None = None
    head: list[str] | None = Field(None, description="The modules after pooling, in order (Dense, LayerNorm, "
                                                     "Normalize).")
    precisions: list[str] | None = Field(None, description="Embedding models: the precisions it answers (int8 and "
                                                           "uint8 only with quantization ranges).")
    quantization_ranges: QuantizationRangesCard | None = Field(
        None, description="Embedding models: the int8/uint8 ranges, part of the model's identity (the same digest, "
                          "the same quantized vectors); null when it has none.")
    labels: list[str] | None = Field(None, description="Rerankers and classifiers: the labels (config.json id2label).")
    activation: str | None = Field(None, description="Rerankers and classifiers: the activation on the logits, as "
                                                     "sentence-transformers' CrossEncoder applies it.")
    splade_pooling: str | None = Field(None, description="Sparse models: SpladePooling's strategy (max or sum).")
    max_active_dims: int | None = Field(None, description="Sparse models: the folder's default top-k, if any.")
    routes: list[str] | None = Field(None, description="Inference-free sparse models: the routes a request's task "
                                                       "picks.")
    default_route: str | None = None
    activation_source: str | None = Field(None, description="Where the activation comes from (the folder's file and "
                                                            "key, or sentence-transformers' default).")
    status: str | None = Field(None, description="The encoder deployment's status (HEALTHY, UPSCALING, "
                                                 "UNHEALTHY, ...), as serve.status() says.")
    status_message: str | None = None
    replicas: dict[str, int] = Field(default_factory=dict,
                                     description="Replica counts by state, e.g. {\"running\": 1, \"starting\": 1}.")


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str]


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None
    request_id: str | None = Field(None, description="The request's X-Request-Id: quote it when reporting a fault.")


class ErrorResponse(BaseModel):
    """Every error, OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""

    error: ErrorDetail
