"""``embedding-cluster bench``: every way to embed a corpus, on the same tokens, in one run.

Contenders: the in-process limit (``encode_folded``), a naive padded
``transformers`` loop, ``sentence-transformers`` (short texts only: it
truncates), the cluster through its handle, over HTTP and over gRPC (TEI's ``Embed``), single-text latency,
late chunking against chunks embedded alone, reranking against ``CrossEncoder.predict``,
SPLADE against ``SparseEncoder.encode`` (and its replica's memory against the dense model's),
the bulk ``ray.data`` job, and peers: embedding servers already running (Infinity, TEI), sent the
cluster's texts by the cluster's own client code.
Speed targets live here, never in unit tests.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import re
import statistics
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np

from cluster.config import ClusterConfig, GRPCConfig
from cluster.front import apply_front, free_port
from deployments.loading import concurrent_batches, load_encoder, load_indexer, replica_device
from deployments.settings import ModelConfig
from embedder.inference import EncodeStats, encode_folded

if TYPE_CHECKING:
    import psutil

logger = logging.getLogger(__name__)

CORPUS_MODULES = ("json", "collections", "asyncio", "email", "argparse", "logging", "typing", "subprocess",
                  "pathlib", "dataclasses", "functools", "itertools", "unittest", "http.client",
                  "urllib.request", "inspect", "threading", "decimal", "fractions", "statistics",
                  "numpy", "numpy.linalg", "torch", "torch.nn", "torch.nn.functional", "pandas",
                  "transformers.modeling_utils", "transformers.tokenization_utils_base",
                  "ray.data.dataset", "pydantic", "pyarrow.compute")
SHORT_MAX_CHARS = 200
CLIENTS = 32
TEXTS_PER_REQUEST = 16
BULK_COPIES = 4
CHUNK_SIZE = 128
DOCUMENTS_PER_REQUEST = 2
#: Non-zeros a short text gets from the bench's SPLADE model, about what a trained SPLADE model gives a
#: sentence (an untrained masked-LM head activates most of the vocabulary instead).
SPARSE_ACTIVE_DIMS = 128
SPARSE_CALIBRATION_TEXTS = 32
RSS_INTERVAL_S = 0.05
SPARSE_HTTP = f"sparse: /embed_sparse over HTTP, {CLIENTS} clients"
DENSE_FOR_SPARSE = "sparse: the dense model's /embed, fresh replica"
ONE_TEXT = f"one text a request, {CLIENTS} clients"
SHORT_TEXTS = f"short texts, {TEXTS_PER_REQUEST} a request, {CLIENTS} clients"
LATENCY = "latency, one short text"
CLUSTER_ONE_TEXT = f"cluster over HTTP, {ONE_TEXT}"
CLUSTER_GRPC_ONE_TEXT = f"cluster over gRPC, {ONE_TEXT}"
#: Texts a peer is sent in one request before it is timed, to check its answer.
PEER_CHECK_TEXTS = TEXTS_PER_REQUEST
#: Below this cosine between a peer's vector and the cluster's for a text, the peer serves another model.
MIN_PEER_COSINE = 0.99
PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Corpus:
    """Short texts (one sentence) and long documents (whole docstrings)."""

    short: list[str]
    long: list[str]

    @property
    def texts(self) -> list[str]:
        return self.short + self.long


def default_corpus(short: int, long: int) -> Corpus:
    """Real English this machine already has: the docstrings of installed standard modules."""
    docs = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        members = [module, *vars(module).values()]
        members += [m for cls in list(members) if inspect.isclass(cls) for m in vars(cls).values()]
        for obj in members:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) or inspect.isclass(obj) else None
            if doc:
                docs.append(" ".join(doc.split()))
    docs = list(dict.fromkeys(docs))
    sentences = [s for d in docs for s in re.split(r"(?<=[.!?])\s+", d) if 30 <= len(s) <= SHORT_MAX_CHARS]
    sentences = list(dict.fromkeys(sentences))
    documents = sorted((d for d in docs if len(d) > 1500), key=len, reverse=True)
    if len(sentences) < short or len(documents) < long:
        raise RuntimeError("not enough docstrings on this machine for the default corpus; pass --corpus")
    rng = np.random.default_rng(0)
    return Corpus(short=[sentences[i] for i in rng.choice(len(sentences), short, replace=False)],
                  long=[documents[i] for i in rng.choice(len(documents), long, replace=False)])


def load_corpus(path: str, text_column: str = "text") -> Corpus:
    texts = [json.loads(line)[text_column] for line in Path(path).read_text().splitlines() if line.strip()]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    return Corpus(short=[t for t in texts if len(t) <= SHORT_MAX_CHARS],
                  long=[t for t in texts if len(t) > SHORT_MAX_CHARS])


@dataclass
class Result:
    name: str
    texts: int
    seconds: float
    wordpieces: int = 0
    padding_efficiency: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    cores: dict[str, float] = field(default_factory=dict)  # CPU cores each process used during the row's run
    dtype: str = ""
    short_only: bool = False  # compared with the limit on the short texts, else with the whole corpus
    compare: bool = True  # False: another mix than the limit's, no ratio
    memory_mib: dict[str, float] = field(default_factory=dict)  # the serving replica's RSS: "before", "peak"

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def wordpieces_per_s(self) -> float:
        return self.wordpieces / self.seconds if self.seconds else 0.0


def _timed(function, repeats: int) -> float:
    """Median seconds of ``repeats`` runs (after one warm-up run)."""
    function()
    return statistics.median(_once(function) for _ in range(repeats))


def _once(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def bench_limit(model: ModelConfig, texts: list[str], repeats: int, name: str, short_only: bool = False) -> Result:
    """The model's own forward passes in one process, on pre-tokenized, length-sorted token-budget
    batches, run as a replica runs them: ``concurrent_batches`` at once, each on its own thread."""
    import torch

    workers = concurrent_batches(model, replica_device(model))
    encoder, _ = load_encoder(model, threads=max(1, model.cpu_threads // workers))
    embedder = encoder.embedder
    batch = encoder.indexer.fold(texts)
    order = np.argsort(batch.num_wordpieces, kind="stable")
    parts = [encoder.indexer.fold(part) for part in _token_budget_parts(
        [texts[i] for i in order], batch.num_wordpieces[order], model.max_batch_tokens)]
    part_stats = [EncodeStats() for _ in parts]

    def run(pool: ThreadPoolExecutor, stats: list[EncodeStats | None]) -> None:
        list(pool.map(lambda part, part_stat: encode_folded(embedder, part, head=encoder.head, stats=part_stat,
                                                            max_batch_tokens=model.max_batch_tokens), parts, stats))

    with ThreadPoolExecutor(workers) as pool:
        run(pool, part_stats)  # the padding of the very batches timed
        seconds = _timed(lambda: run(pool, [None] * len(parts)), repeats)
    torch.set_num_threads(model.cpu_threads)
    padding = sum(s.real_tokens for s in part_stats) / sum(s.computed_tokens for s in part_stats)
    dtype = f"{embedder.dtype}".removeprefix("torch.")
    return Result(name, len(texts), seconds, int(batch.num_wordpieces.sum()), padding,
                  note=f"{dtype} on {embedder.device.type}, {workers} batches at once", dtype=dtype,
                  short_only=short_only)


def _token_budget_parts(texts: list[str], wordpieces: np.ndarray, budget: int) -> list[list[str]]:
    """Consecutive runs of ``texts`` of at most ``budget`` wordpieces each (a longer text alone): the
    batches a loaded replica takes."""
    parts, start, total = [], 0, 0
    for index, size in enumerate(wordpieces):
        if index > start and total + size > budget:
            parts.append(texts[start:index])
            start, total = index, 0
        total += int(size)
    return parts + [texts[start:]]


def _padded(segments: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (right-padded with 0) and the attention mask of ``segments``, as one batch."""
    ids = np.zeros((len(segments), max(len(s) for s in segments)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, segment in enumerate(segments):
        ids[row, :len(segment)], mask[row, :len(segment)] = segment, 1
    return ids, mask


def bench_naive(model: ModelConfig, corpus: Corpus, repeats: int) -> Result:
    """A hand-written loop: the same segments, input order, padded batches of 32."""
    import torch

    encoder, _ = load_encoder(model, threads=model.cpu_threads)
    batch = encoder.indexer.fold(corpus.texts)
    segments = np.split(batch.token_ids, np.cumsum(batch.segment_lengths)[:-1])
    transformer = encoder.embedder.transformer_model
    real = int(batch.segment_lengths.sum())
    computed = 0
    chunks = [segments[i:i + 32] for i in range(0, len(segments), 32)]
    for chunk in chunks:
        computed += len(chunk) * max(len(s) for s in chunk)

    def run() -> None:
        with torch.inference_mode():
            for chunk in chunks:
                ids, mask = _padded(chunk)
                transformer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

    seconds = _timed(run, repeats)
    return Result("naive: transformers, batches of 32 in order", len(corpus.texts), seconds,
                  int(batch.num_wordpieces.sum()), real / computed)


def bench_sentence_transformers(model: ModelConfig, corpus: Corpus, repeats: int) -> list[Result]:
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return []
    wordpieces = int(load_indexer(model).fold(corpus.short).num_wordpieces.sum())
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        encoder = SentenceTransformer(model.model_name, device="cpu", model_kwargs={"dtype": dtype})
        seconds = _timed(lambda: encoder.encode(corpus.short, batch_size=32), repeats)
        results.append(Result(f"sentence-transformers encode ({str(dtype).removeprefix('torch.')})",
                              len(corpus.short), seconds, wordpieces, note="short texts only (it truncates)",
                              short_only=True))
    return results


def bench_forward_latency(model: ModelConfig, texts: list[str]) -> Result:
    """One short text through ``encode_folded`` in this process (folding included): what the
    cluster's single-text latency is measured against (on all the model's threads: its fastest)."""
    encoder, _ = load_encoder(model, threads=model.cpu_threads)

    def forward(text: str) -> None:
        encode_folded(encoder.embedder, encoder.indexer.fold([text]), head=encoder.head)

    for text in texts[:10]:
        forward(text)
    return Result(LATENCY, len(texts), 0.0, extra={"in-process forward": _latency(forward, texts)})


def bench_kernels(model: ModelConfig, corpus: Corpus, repeats: int) -> list[Result]:
    """The fp32 CPU kernels a user could pick instead, on the same short texts: PyTorch eager and ONNX
    Runtime on the same length-sorted batches of 32 (the model exported here with ``torch.onnx``), and
    ``fastembed`` as its users call it (its defaults: batches of 256 in input order) on that ONNX file.
    Skipped when ``onnxruntime``/``onnxscript`` are not installed (``pip install '.[bench]'``); fastembed
    alone when it is not. Vectors: masked mean of the last layer, compared by cosine with PyTorch's."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        logger.info("ONNX Runtime rows skipped: pip install '.[bench]'")
        return []
    import tempfile

    import torch

    encoder, _ = load_encoder(model.model_copy(update={"dtype": "float32"}), threads=model.cpu_threads)
    transformer = encoder.embedder.transformer_model
    batch = encoder.indexer.fold(corpus.short)
    order = np.argsort(batch.segment_lengths, kind="stable")  # short texts are one segment each
    segments = np.split(batch.token_ids, np.cumsum(batch.segment_lengths)[:-1])
    segments = [segments[i] for i in order]
    batches = [_padded(segments[start:start + 32]) for start in range(0, len(segments), 32)]

    def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    def run_torch() -> list[np.ndarray]:
        with torch.inference_mode():
            return [mean_pooled(transformer(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
                                .last_hidden_state.numpy(), mask) for ids, mask in batches]

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    wordpieces = int(batch.num_wordpieces.sum())
    note = "short texts, length-sorted batches of 32"
    reference = np.concatenate(run_torch())
    with tempfile.TemporaryDirectory() as folder:
        rows, width = torch.export.Dim("rows"), torch.export.Dim("width", max=int(batch.segment_lengths.max()) + 1)
        program = torch.onnx.export(LastHidden(), tuple(torch.from_numpy(a) for a in batches[-1]), dynamo=True,
                                    input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                                    dynamic_shapes={"input_ids": {0: rows, 1: width},
                                                    "attention_mask": {0: rows, 1: width}}, verbose=False)
        program.optimize()
        program.save(f"{folder}/model.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = model.cpu_threads
        session = onnxruntime.InferenceSession(f"{folder}/model.onnx", options, providers=["CPUExecutionProvider"])

        def run_onnx() -> list[np.ndarray]:
            return [mean_pooled(session.run(None, {"input_ids": ids, "attention_mask": mask})[0], mask)
                    for ids, mask in batches]

        results = [Result("kernel: PyTorch eager fp32", len(corpus.short), _timed(run_torch, repeats), wordpieces,
                          note=note, short_only=True),
                   Result("kernel: ONNX Runtime fp32 (exported here)", len(corpus.short), _timed(run_onnx, repeats),
                          wordpieces, note=f"{note}; min cos to PyTorch "
                                               f"{_min_cosine(reference, np.concatenate(run_onnx())):.6f}",
                          short_only=True)]
        results += _bench_fastembed(model, folder, corpus, repeats, wordpieces, reference, order)
    return results


def _bench_fastembed(model: ModelConfig, onnx_folder: str, corpus: Corpus, repeats: int, wordpieces: int,
                     reference: np.ndarray, order: np.ndarray) -> list[Result]:
    """fastembed on the ONNX file exported here, registered as a local custom model (no download);
    ``reference`` holds PyTorch's vectors of the short texts in ``order``."""
    try:
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType
    except ImportError:
        logger.info("fastembed row skipped: pip install fastembed")
        return []
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if Path(model.model_name, name).exists():
            shutil.copy(Path(model.model_name, name), onnx_folder)
    local_name = f"embedding-cluster-bench/{Path(model.model_name).name}-{os.getpid()}-{time.monotonic_ns()}"
    TextEmbedding.add_custom_model(model=local_name, pooling=PoolingType.MEAN, normalization=False,
                                   sources=ModelSource(hf=local_name), dim=reference.shape[1],
                                   model_file="model.onnx")
    embedding = TextEmbedding(local_name, specific_model_path=onnx_folder, threads=model.cpu_threads)

    def run() -> np.ndarray:
        return np.stack(list(embedding.embed(corpus.short)))

    cosine = _min_cosine(reference, run()[order])
    return [Result("kernel: fastembed fp32 (same ONNX file)", len(corpus.short), _timed(run, repeats), wordpieces,
                   note=f"its defaults: batches of 256 in input order; min cos to PyTorch {cosine:.6f}",
                   short_only=True)]


def _min_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    return float(((reference * other).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(other, axis=1)).min())


def _chunks(texts: list[str], size: int = TEXTS_PER_REQUEST) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


Body = Callable[[list[str]], dict]


def _inputs(texts: list[str]) -> dict:
    """The cluster's own request body (``/embed``, ``/embed_sparse``, ``/embed_chunks``)."""
    return {"inputs": texts}


async def _http_run(url: str, texts: list[str], path: str = "/embed", per_request: int = TEXTS_PER_REQUEST,
                    body: Body = _inputs, **fields) -> list:
    """POST ``texts`` to ``url + path`` in requests of ``per_request`` (each ``body(chunk)`` with
    ``fields``) from ``CLIENTS`` concurrent clients; the answers."""
    import httpx

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        semaphore = asyncio.Semaphore(CLIENTS)

        async def send(chunk: list[str]):
            async with semaphore:
                response = await client.post(url + path, json=body(chunk) | fields)
                response.raise_for_status()
                return response.json()

        return await asyncio.gather(*(send(c) for c in _chunks(texts, per_request)))


async def _grpc_run(target: str, texts: list[str], application: str) -> list:
    """Embed each of ``texts`` alone over gRPC (TEI's ``Embed``) from ``CLIENTS`` concurrent clients,
    each on its own channel (``_http_run``'s connections); the answers."""
    import grpc

    from deployments.protos import tei_pb2, tei_pb2_grpc

    metadata = (("application", application),)
    answers: list = [None] * len(texts)
    channels = [grpc.aio.insecure_channel(target) for _ in range(CLIENTS)]

    async def client(number: int) -> None:
        stub = tei_pb2_grpc.EmbedStub(channels[number])
        for index in range(number, len(texts), CLIENTS):
            answer = await stub.Embed(tei_pb2.EmbedRequest(inputs=texts[index]), metadata=metadata)
            answers[index] = answer.embeddings

    try:
        await asyncio.gather(*(client(number) for number in range(CLIENTS)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return answers


def _grpc_latency(target: str, texts: list[str], application: str) -> dict[str, float]:
    """``_latency`` of embedding each of ``texts`` alone over gRPC, one call after the other on one channel."""
    import grpc

    from deployments.protos import tei_pb2, tei_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = tei_pb2_grpc.EmbedStub(channel)
        metadata = (("application", application),)
        return _latency(lambda text: stub.Embed(tei_pb2.EmbedRequest(inputs=text), metadata=metadata), texts)


async def _handle_run(client, texts: list[str]) -> None:
    semaphore = asyncio.Semaphore(CLIENTS)

    async def send(chunk: list[str]) -> None:
        async with semaphore:
            await client.aembed(chunk)

    await asyncio.gather(*(send(c) for c in _chunks(texts)))


def _cores_by_process(run: Callable[[], object]) -> dict[str, float]:
    """CPU cores each of this machine's Ray processes (and this one) used while ``run`` ran: where a
    run's time goes when the cluster shares the machine's cores."""
    import psutil

    processes = [p for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::")] + [psutil.Process()]
    names = {p.pid: p.info["cmdline"][0].removeprefix("ray::") if p.pid != os.getpid() else "client (this process)"
             for p in processes}

    def cpu_seconds(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    before = {p.pid: cpu_seconds(p) for p in processes}
    seconds = _once(run)
    cores: dict[str, float] = {}
    for process in processes:
        name = names[process.pid]
        cores[name] = cores.get(name, 0.0) + (cpu_seconds(process) - before[process.pid]) / seconds
    return {name: round(c, 2) for name, c in sorted(cores.items(), key=lambda kv: -kv[1]) if c >= 0.01}


def _replica_process(app_name: str, deployment: str) -> psutil.Process:
    """The ``psutil.Process`` of ``deployment``'s replica on this machine, found by its title as
    ``_cores_by_process`` finds the Ray processes (``ray::ServeReplica:APP:DEPLOYMENT``, ``.method``
    appended while it runs one)."""
    import psutil

    title = re.compile(rf"ray::ServeReplica:{re.escape(app_name)}:{re.escape(deployment)}(\.|$)")
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] and title.match(process.info["cmdline"][0]):
            return process
    raise LookupError(f"no replica process of {app_name}:{deployment} on this machine")


def _memory_during(process: psutil.Process, run: Callable[[], float]) -> tuple[float, dict[str, float]]:
    """``run()``'s answer, and ``process``'s RSS in MiB before it and at its peak while it ran, sampled
    every ``RSS_INTERVAL_S`` in a thread (not VmHWM, which would count start-up's peak too)."""
    before = peak = process.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(RSS_INTERVAL_S):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answer = run()
    finally:
        stop.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return answer, {"before": round(before / 2**20, 1), "peak": round(peak / 2**20, 1)}


def _latency(call, texts: list[str]) -> dict[str, float]:
    times = [_once(lambda t=t: call(t)) for t in texts]
    return {"p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * float(np.percentile(times, 95))}


def _http_latency(url: str, texts: list[str], body: Body = _inputs) -> dict[str, float]:
    """``_latency`` of POSTing each of ``texts`` alone to ``url``, one request after the other on one
    keep-alive connection."""
    import httpx

    with httpx.Client(timeout=60) as http:
        return _latency(lambda text: http.post(url, json=body([text])).raise_for_status(), texts)


def bench_cluster(config: ClusterConfig, corpus: Corpus, repeats: int, latency_requests: int,
                  reranker: str | None = None, sparse: str | None = None, peers: Sequence[Peer] = ()) -> list[Result]:
    """Start a local cluster with ``config``, measure the handle, HTTP, gRPC (one text a request, beside
    HTTP's), latency, ``peers`` beside it, reranking, SPLADE and bulk, shut it down."""
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.client import EmbeddingClient

    model = config.models[0]
    wordpieces = int(load_indexer(model).fold(corpus.texts).num_wordpieces.sum())
    front = apply_front(config.http.front)
    logger.info("the cluster's HTTP front: %s", front)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="embedding-cluster-bench")
    try:
        serve.start(http_options={"host": config.http.host, "port": config.http.port},
                    grpc_options=config.grpc.serve_options())
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        url = f"http://{config.http.host}:{config.http.port}"
        grpc_target = f"{config.http.host}:{config.grpc.port}"
        client = EmbeddingClient(app_name=config.app_name)
        texts = corpus.texts
        handle = Result(f"cluster via handle, {CLIENTS} concurrent", len(texts),
                        _timed(lambda: asyncio.run(_handle_run(client, texts)), repeats), wordpieces)
        over_http = Result(f"cluster over HTTP, {CLIENTS} concurrent clients", len(texts),
                           _timed(lambda: asyncio.run(_http_run(url, texts)), repeats), wordpieces)
        short_wordpieces = int(load_indexer(model).fold(corpus.short).num_wordpieces.sum())
        short_http = Result("cluster over HTTP, short texts only", len(corpus.short),
                            _timed(lambda: asyncio.run(_http_run(url, corpus.short)), repeats), short_wordpieces,
                            short_only=True)
        short_http.cores = _cores_by_process(lambda: asyncio.run(_http_run(url, corpus.short)))
        probes = corpus.short[:latency_requests]
        http_latency = _http_latency(f"{url}/embed", probes)
        handle_latency = _latency(lambda t: client.embed([t]), probes)
        grpc_latency = _grpc_latency(grpc_target, probes, config.app_name)
        latency = Result(LATENCY, latency_requests, 0.0,
                         extra={"http": http_latency, "grpc": grpc_latency, "handle": handle_latency})
        one_text = [Result(CLUSTER_ONE_TEXT, len(corpus.short),
                           _timed(lambda: asyncio.run(_http_run(url, corpus.short, per_request=1)), repeats),
                           short_wordpieces, short_only=True),
                    Result(CLUSTER_GRPC_ONE_TEXT, len(corpus.short),
                           _timed(lambda: asyncio.run(_grpc_run(grpc_target, corpus.short, config.app_name)),
                                  repeats), short_wordpieces, short_only=True)]
        peer_results = []
        if peers:  # each peer's rows on the same texts as the cluster's one-text rows, by the same client code
            checked = corpus.short[:PEER_CHECK_TEXTS]
            reference = np.asarray([v for answer in asyncio.run(_http_run(url, checked)) for v in answer])
            for peer in peers:
                peer_results += bench_peer(peer, corpus.short, short_wordpieces, repeats, latency_requests, reference)
        chunking = bench_chunks(url, model, corpus.long, repeats)
        serve.delete(config.app_name)
        reranking = bench_rerank(config, corpus, repeats, reranker)
        sparse_results = bench_sparse(config, corpus, repeats, sparse)
        bulk_results = bench_bulk(model, texts)
        return [handle, over_http, short_http, latency, *one_text, *peer_results, *chunking, *reranking,
                *sparse_results, *bulk_results]
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass(frozen=True)
class Peer:
    """An embedding server already running (Infinity, TEI, ...) at ``url``, an OpenAI-style embeddings
    route: sent ``{"model": model, "input": [texts]}``, it answers ``{"data": [{"embedding": [...]}, ...]}``."""

    name: str
    url: str
    model: str | None = None  # None: the bench model's name (``run_bench`` fills it in)

    def body(self, texts: list[str]) -> dict:
        """The request body that embeds ``texts`` (``_http_run``'s ``body``)."""
        return {"model": self.model, "input": texts}


class PeerError(RuntimeError):
    """A peer that cannot be reached or answers wrongly; the message names it and its URL."""


def parse_peer(value: str) -> Peer:
    """``NAME=URL[=MODEL]``, an entry of serve_floor.py's ``PEERS``: NAME goes in the rows' names, URL
    is the peer's embeddings route (http or https, no '=' in it), MODEL what its requests put in
    "model". A ``ValueError`` says what is wrong with ``value``."""
    parts = value.split("=")
    if len(parts) not in (2, 3):
        raise ValueError(f"{value!r} is not NAME=URL[=MODEL] (e.g. infinity=http://127.0.0.1:7997/embeddings=minilm)")
    name, url, model = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    if not PEER_NAME.fullmatch(name):
        raise ValueError(f"peer name {name!r} in {value!r}: letters, digits, '.', '_' and '-' only")
    split = urlsplit(url)
    try:
        port = split.port
    except ValueError:  # a port that is no number, or out of range
        port = 0
    if split.scheme not in ("http", "https") or not split.hostname or port == 0:
        raise ValueError(f"peer {name}: {url!r} is not an http(s) URL with a host")
    if model == "":
        raise ValueError(f"peer {name}: the MODEL after its URL is empty")
    return Peer(name, url, model)


def peer_row(name: str, what: str) -> str:
    """The name of peer ``name``'s row ``what`` (``ONE_TEXT``, ``SHORT_TEXTS``, ``LATENCY``)."""
    return f"peer {name}: {what}"


def check_peer(peer: Peer, texts: list[str], reference: np.ndarray | None = None) -> str:
    """POST ``texts`` to ``peer`` in one request: a ``PeerError`` unless it answers 200 with one vector a
    text. With ``reference`` (the cluster's vectors of ``texts``): a note of their least cosine, a
    warning (logged too) when under ``MIN_PEER_COSINE`` or when the dims differ, as from another model."""
    import httpx

    where = f"peer {peer.name} at {peer.url}"
    try:
        response = httpx.post(peer.url, json=peer.body(texts), timeout=60)
    except httpx.HTTPError as error:
        raise PeerError(f"{where} cannot be reached: {error}") from error
    if response.status_code != 200:
        raise PeerError(f"{where} answered {response.status_code}: {response.text[:200]}")
    try:
        vectors = np.asarray([entry["embedding"] for entry in response.json()["data"]], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as error:
        raise PeerError(f"{where} did not answer OpenAI's data[].embedding lists of floats: "
                        f"{response.text[:200]}") from error
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise PeerError(f"{where} answered {len(vectors)} vectors for {len(texts)} texts")
    if reference is None:
        return ""
    if vectors.shape[1] != reference.shape[1]:
        warning = f"{vectors.shape[1]} dims, the cluster's {reference.shape[1]}: not compared"
    else:
        cosine = _min_cosine(reference, vectors)
        if cosine >= MIN_PEER_COSINE:
            return f"min cos to the cluster {cosine:.4f}"
        warning = f"min cos to the cluster {cosine:.4f} < {MIN_PEER_COSINE}"
    logger.warning("%s (model %r): %s; another model than the cluster's?", where, peer.model, warning)
    return f"WARNING: {warning}"


def bench_peer(peer: Peer, texts: list[str], wordpieces: int, repeats: int, latency_requests: int,
               reference: np.ndarray) -> list[Result]:
    """``peer``'s rows, timed as the cluster's are (``_http_run``, ``_http_latency``) on the same short
    ``texts`` (``wordpieces`` by the bench model's tokenizer): one text a request from ``CLIENTS``
    clients, the first ``latency_requests`` alone one after the other, ``TEXTS_PER_REQUEST`` a request.
    Checked first (``check_peer``) against ``reference``, the cluster's vectors of the first texts."""
    import httpx

    note = f"model {peer.model!r}; {check_peer(peer, texts[:len(reference)], reference)}"

    def timed(per_request: int) -> float:
        return _timed(lambda: asyncio.run(_http_run(peer.url, texts, "", per_request, peer.body)), repeats)

    try:
        one_text = Result(peer_row(peer.name, ONE_TEXT), len(texts), timed(1), wordpieces, note=note, compare=False)
        latency = Result(peer_row(peer.name, LATENCY), latency_requests, 0.0,
                         extra={"http": _http_latency(peer.url, texts[:latency_requests], peer.body)})
        short_texts = Result(peer_row(peer.name, SHORT_TEXTS), len(texts), timed(TEXTS_PER_REQUEST), wordpieces,
                             note=note, compare=False)
    except httpx.HTTPError as error:
        raise PeerError(f"peer {peer.name} at {peer.url} failed while timed: {error}") from error
    return [one_text, latency, short_texts]


def bench_chunks(url: str, model: ModelConfig, documents: list[str], repeats: int) -> list[Result]:
    """Late chunking (``/embed_chunks``, each document encoded once) against ``/embed`` on the same chunks
    cut client-side (each embedded alone), over HTTP on the long documents: texts/s here are chunks/s."""
    def late_chunking() -> list:
        return asyncio.run(_http_run(url, documents, "/embed_chunks", per_request=DOCUMENTS_PER_REQUEST,
                                     chunk_size=CHUNK_SIZE))

    answers = late_chunking()
    chunk_texts = [c["text"] for answer in answers for entry in answer["data"] for c in entry["chunks"]]
    document_wordpieces = sum(answer["usage"]["prompt_tokens"] for answer in answers)
    chunk_wordpieces = int(load_indexer(model).fold(chunk_texts).num_wordpieces.sum())
    late = Result(f"late chunking: /embed_chunks ({CHUNK_SIZE}-wordpiece chunks)", len(chunk_texts),
                  _timed(late_chunking, repeats), document_wordpieces,
                  note=f"long documents, {DOCUMENTS_PER_REQUEST} a request; texts = chunks", compare=False)
    alone = Result("chunks cut client-side, /embed each alone", len(chunk_texts),
                   _timed(lambda: asyncio.run(_http_run(url, chunk_texts)), repeats), chunk_wordpieces,
                   note="the same chunks' texts", compare=False)
    return [late, alone]


def bench_reranker_folder(model: ModelConfig, folder: Path) -> str:
    """A reranker of the bench model's shape: its transformer with a fresh one-label head (seeded),
    saved as a plain ``*ForSequenceClassification`` folder; the compute of a cross-encoder such as
    ms-marco-MiniLM-L6-v2 for the bundled MiniLM (no hub here to fetch a trained one)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(model.model_name, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model.model_name).save_pretrained(folder)
    return str(folder)


def rerank_requests(corpus: Corpus) -> list[tuple[str, list[str]]]:
    """(query, documents) requests over the short texts: each query the first words of another text."""
    short = corpus.short
    return [(" ".join(short[(start * 7 + 3) % len(short)].split()[:8]), short[start:start + TEXTS_PER_REQUEST])
            for start in range(0, len(short), TEXTS_PER_REQUEST)]


async def _rerank_run(url: str, requests: list[tuple[str, list[str]]], model: str) -> list:
    """POST each (query, documents) to ``/rerank`` from ``CLIENTS`` concurrent clients; the answers."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        semaphore = asyncio.Semaphore(CLIENTS)

        async def send(query: str, documents: list[str]):
            async with semaphore:
                response = await client.post("/rerank", json={"model": model, "query": query, "texts": documents})
                response.raise_for_status()
                return response.json()

        return await asyncio.gather(*(send(query, documents) for query, documents in requests))


def bench_rerank(config: ClusterConfig, corpus: Corpus, repeats: int, reranker: str | None = None) -> list[Result]:
    """Reranking over HTTP (``/rerank``, one query and 16 texts a request) against
    ``CrossEncoder.predict`` in this process on the same pairs at the same dtype; and long documents
    (each read in windows beside its query, MaxP) against ``CrossEncoderScorer`` in this process:
    texts/s are pairs/s, and windows/s for the long documents. ``reranker``: a folder (default: one
    built from the bench model, ``bench_reranker_folder``)."""
    import tempfile

    import torch
    from ray import serve

    from cluster.app import build_app
    from embedder.cross_encoder import CrossEncoderScorer
    from embedder.devices import choose_dtype

    model = config.models[0]
    with tempfile.TemporaryDirectory(prefix="bench-reranker-") as scratch:
        folder = reranker or bench_reranker_folder(model, Path(scratch) / "reranker")
        served = ModelConfig(name="bench-reranker", model_name=folder, dtype=model.dtype, device=model.device,
                             num_cpus=model.num_cpus, num_gpus=model.num_gpus, torch_threads=model.torch_threads,
                             concurrent_batches=model.concurrent_batches, max_batch_tokens=model.max_batch_tokens)
        dtype = choose_dtype(model.dtype, torch.device("cuda" if model.num_gpus else "cpu"))
        dtype_name = str(dtype).removeprefix("torch.")
        requests = rerank_requests(corpus)
        pairs = [(query, document) for query, documents in requests for document in documents]
        long_pairs = [(" ".join(query.split()[:8]), document) for query, document in zip(corpus.short, corpus.long)]
        scorer = CrossEncoderScorer(folder, dtype=dtype, max_batch_tokens=model.max_batch_tokens)
        torch.set_num_threads(model.cpu_threads)
        tokens = scorer.plan(pairs).num_tokens
        long_plan = scorer.plan(long_pairs)
        in_process_long = Result(f"rerank limit: CrossEncoderScorer, long documents ({dtype_name})",
                                 long_plan.num_segments, _timed(lambda: scorer.score_pairs(long_pairs), repeats),
                                 long_plan.num_tokens, note="texts = windows (MaxP)", compare=False)
        from sentence_transformers import CrossEncoder

        reference = CrossEncoder(folder, device="cpu", model_kwargs={"dtype": dtype})
        predict = Result(f"rerank: CrossEncoder.predict ({dtype_name})", len(pairs),
                         _timed(lambda: reference.predict(pairs), repeats), tokens,
                         note="pairs of short texts, batches of 32 in input order; texts = pairs", compare=False)
        app_config = config.model_copy(update={"models": [served]})
        serve.run(build_app(app_config), name=config.app_name, route_prefix="/")
        url = f"http://{config.http.host}:{config.http.port}"
        try:
            over_http = Result(f"rerank: cluster /rerank over HTTP, {CLIENTS} clients", len(pairs),
                               _timed(lambda: asyncio.run(_rerank_run(url, requests, served.name)), repeats), tokens,
                               note=f"1 query + {TEXTS_PER_REQUEST} texts a request; texts = pairs", compare=False)
            long_requests = [(query, [document]) for query, document in long_pairs]
            long_http = Result("rerank: cluster /rerank, long documents in windows", long_plan.num_segments,
                               _timed(lambda: asyncio.run(_rerank_run(url, long_requests, served.name)), repeats),
                               long_plan.num_tokens, note="one document a request; texts = windows (MaxP)",
                               compare=False)
        finally:
            serve.delete(config.app_name)
    return [predict, over_http, in_process_long, long_http]


def bench_sparse_folder(model: ModelConfig, folder: Path, texts: list[str]) -> str:
    """A SPLADE model of the bench model's shape: its transformer under a fresh masked-LM head (seeded),
    as a sentence-transformers ``SparseEncoder`` (``Transformer`` for fill-mask + max ``SpladePooling``)
    written by its ``save``; the compute of a SPLADE model of that size (no hub here to fetch a trained one).
    The head's output bias is lowered until ``texts`` (the first few) get ``SPARSE_ACTIVE_DIMS``
    non-zeros each on average, so the answers are as long as a trained model's."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(0)
    masked_lm = AutoModelForMaskedLM.from_pretrained(model.model_name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.model_name)
    calibration = texts[:SPARSE_CALIBRATION_TEXTS]
    batch = tokenizer(calibration, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = masked_lm(**batch).logits.masked_fill(~batch["attention_mask"].bool()[..., None], -torch.inf)
        # a dimension is non-zero where its largest logit over the text is positive (max pooling)
        largest = logits.amax(dim=1).flatten()
        masked_lm.get_output_embeddings().bias -= largest.kthvalue(largest.numel() - SPARSE_ACTIVE_DIMS *
                                                                   len(calibration)).values
    source = folder.parent / f"{folder.name}-masked-lm"
    masked_lm.save_pretrained(source)
    tokenizer.save_pretrained(source)
    modules = [Transformer(str(source), transformer_task="fill-mask"), SpladePooling(pooling_strategy="max")]
    SparseEncoder(modules=modules, device="cpu").save(str(folder))
    return str(folder)


def bench_sparse(config: ClusterConfig, corpus: Corpus, repeats: int, sparse: str | None = None) -> list[Result]:
    """SPLADE over HTTP (``/embed_sparse``, the short texts as the dense HTTP rows send them) against
    ``SparseEncoder.encode`` in this process on the same texts at the same dtype and threads; and the
    sparse replica's peak RSS during its HTTP runs against a fresh replica of the dense model's during
    the same texts over ``/embed`` (each model served alone: this machine may not fit both).
    ``sparse``: a SparseEncoder folder (default: one built from the bench model, ``bench_sparse_folder``)."""
    import tempfile

    import torch
    from sentence_transformers import SparseEncoder

    from embedder.devices import choose_dtype
    from embedder.indexer import PretrainedTransformerIndexer
    from embedder.sparse_encoder import resolve_sparse_encoder

    model = config.models[0]
    texts = corpus.short
    url = f"http://{config.http.host}:{config.http.port}"
    with tempfile.TemporaryDirectory(prefix="bench-sparse-") as scratch:
        folder = sparse or bench_sparse_folder(model, Path(scratch) / "sparse", texts)
        served = ModelConfig(name="bench-sparse", model_name=folder, dtype=model.dtype, device=model.device,
                             num_cpus=model.num_cpus, num_gpus=model.num_gpus, torch_threads=model.torch_threads,
                             concurrent_batches=model.concurrent_batches, max_batch_tokens=model.max_batch_tokens)
        dtype = choose_dtype(model.dtype, torch.device("cuda" if model.num_gpus else "cpu"))
        dtype_name = str(dtype).removeprefix("torch.")
        settings, length = resolve_sparse_encoder(folder)
        indexer = PretrainedTransformerIndexer(settings.transformer_path, max_length=length,
                                               tokenizer_kwargs=settings.tokenizer_kwargs or None)
        wordpieces = int(indexer.fold(texts).num_wordpieces.sum())
        torch.set_num_threads(model.cpu_threads)
        reference = SparseEncoder(folder, device="cpu", model_kwargs={"dtype": dtype})
        encode = Result(f"sparse: SparseEncoder.encode ({dtype_name})", len(texts),
                        _timed(lambda: reference.encode(texts, batch_size=32), repeats), wordpieces,
                        note="short texts, batches of 32 in input order", compare=False)
        sparse_seconds, sparse_memory = _served_run(
            config, served, repeats, lambda: asyncio.run(_http_run(url, texts, "/embed_sparse", model=served.name)))
    dense_seconds, dense_memory = _served_run(config, model, repeats, lambda: asyncio.run(_http_run(url, texts)))
    memory_note = f"replica RSS sampled every {RSS_INTERVAL_S * 1000:.0f} ms"
    over_http = Result(SPARSE_HTTP, len(texts), sparse_seconds, wordpieces, compare=False, memory_mib=sparse_memory,
                       note=f"{TEXTS_PER_REQUEST} short texts a request; {memory_note}")
    dense_wordpieces = int(load_indexer(model).fold(texts).num_wordpieces.sum())
    dense = Result(DENSE_FOR_SPARSE, len(texts), dense_seconds, dense_wordpieces, short_only=True,
                   memory_mib=dense_memory, note=f"the same texts and clients; {memory_note}")
    return [encode, over_http, dense]


def _served_run(config: ClusterConfig, model: ModelConfig, repeats: int,
                run: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """Serve ``model`` alone as ``config``'s app (a fresh replica), time ``run`` against it (``_timed``)
    while sampling its replica's RSS (``_memory_during``), delete the app."""
    from ray import serve

    from cluster.app import build_app
    from deployments.settings import deployment_name

    serve.run(build_app(config.model_copy(update={"models": [model]})), name=config.app_name, route_prefix="/")
    try:
        return _memory_during(_replica_process(config.app_name, deployment_name(model.name)),
                              lambda: _timed(run, repeats))
    finally:
        serve.delete(config.app_name)


def bench_bulk(model: ModelConfig, texts: list[str], copies: int = BULK_COPIES) -> list[Result]:
    """``embed_dataset`` on ``copies`` copies of the corpus (the same mix, so texts/s compare with the
    limit's): end to end, actor start-up included, and steady, from the first output batch to the last."""
    import ray

    from cluster.bulk import TOKENS_COLUMN, embed_dataset

    rows = [{"text": t} for t in texts * copies]
    batch_size = max(16, min(256, len(rows) // 8))  # several output batches even from a small corpus

    def run() -> list[Result]:
        started = time.perf_counter()
        first_out = None
        total_tokens = steady_rows = steady_tokens = 0
        dataset = embed_dataset(ray.data.from_items(rows), model, batch_size=batch_size)
        for batch in dataset.iter_batches(batch_size=None):
            tokens = int(np.sum(batch[TOKENS_COLUMN]))
            total_tokens += tokens
            if first_out is None:
                first_out = time.perf_counter()
            else:
                steady_rows += len(batch[TOKENS_COLUMN])
                steady_tokens += tokens
        ended = time.perf_counter()
        note = f"corpus x{copies}, one run after a warm-up run"
        results = [Result("bulk: embed_dataset (ray.data), end to end", len(rows), ended - started, total_tokens,
                          note=f"{note}, actor start-up included")]
        if steady_rows:
            results.append(Result("bulk: embed_dataset, steady", steady_rows, ended - first_out, steady_tokens,
                                  note=f"{note}, from the first output batch to the last"))
        return results

    run()
    return run()


def run_bench(corpus: Corpus, config: ClusterConfig, repeats: int = 3, latency_requests: int = 100,
              cluster: bool = True, reranker: str | None = None, sparse: str | None = None,
              peers: Sequence[Peer] = ()) -> dict:
    """Run every contender; return the report (also what ``--json`` writes). ``peers`` are measured
    beside the cluster; each is checked first (``check_peer``), so one that is down stops the bench
    (``PeerError``) before anything runs."""
    model = config.models[0]
    peers = [replace(peer, model=peer.model or model.name) for peer in peers]
    for peer in peers:
        check_peer(peer, corpus.short[:PEER_CHECK_TEXTS])
    # first, before the other contenders start threads of their own (ONNX Runtime's, the limit's)
    forward = bench_forward_latency(model, corpus.short[:latency_requests])
    results = [bench_limit(model, corpus.texts, repeats, "limit: encode_folded in-process"),
               bench_limit(model, corpus.short, repeats, "limit, short texts only", short_only=True),
               bench_limit(model.model_copy(update={"dtype": "float32"}), corpus.short, repeats,
                           "limit, short texts only, fp32", short_only=True),
               bench_naive(model, corpus, repeats)]
    results += bench_sentence_transformers(model, corpus, repeats)
    results += bench_kernels(model, corpus, repeats)
    if cluster:
        cluster_results = bench_cluster(config, corpus, repeats, latency_requests, reranker, sparse, peers)
        latency = next(r for r in cluster_results if r.name == forward.name)
        latency.extra = forward.extra | latency.extra
        results += cluster_results
    else:
        results.append(forward)
    limit, short_limit = results[0], results[1]
    rows = []
    for result in results:
        row = asdict(result) | {"texts_per_s": result.texts_per_s, "wordpieces_per_s": result.wordpieces_per_s}
        if result.seconds and result.wordpieces and result.compare:
            # wordpieces/s: the same as texts/s on the same texts, and fair to bulk's steady part
            reference = short_limit if result.short_only else limit
            row["ratio_to_limit"] = result.wordpieces_per_s / reference.wordpieces_per_s
        rows.append(row)
    return {"model": model.name, "short_texts": len(corpus.short), "long_texts": len(corpus.long),
            "repeats": repeats, "results": rows, "targets": targets(rows)}


def targets(rows: list[dict]) -> list[dict]:
    """The serving-speed targets, each with this run's figure and whether it is met (those whose
    rows did not run are left out)."""
    by_name = {row["name"]: row for row in rows}
    found = []

    def check(target: str, figure: float | None, goal: float, at_most: bool = False) -> None:
        if figure is not None:
            found.append({"target": target, "figure": round(figure, 3), "goal": f"{'<=' if at_most else '>='} {goal}",
                          "met": figure <= goal if at_most else figure >= goal})

    def rate(name: str) -> float | None:
        row = by_name.get(name)
        return row["texts_per_s"] if row else None

    latency = by_name.get(LATENCY, {}).get("extra", {})
    forward = latency.get("in-process forward")
    if forward and "http" in latency:
        check("one short text over HTTP, p50 / in-process forward p50", latency["http"]["p50_ms"] / forward["p50_ms"],
              2.0, at_most=True)
        check("one short text over HTTP, p95 / in-process forward p50", latency["http"]["p95_ms"] / forward["p50_ms"],
              3.0, at_most=True)
    for name, goal in (("cluster over HTTP, short texts only", 0.8), ("cluster over HTTP, 32 concurrent clients", 0.9),
                       ("bulk: embed_dataset, steady", 0.9)):
        if "ratio_to_limit" in by_name.get(name, {}):
            check(f"{name} / limit", by_name[name]["ratio_to_limit"], goal)
    dtype = by_name["limit, short texts only"]["dtype"] if "limit, short texts only" in by_name else None
    short_http, same_dtype = rate("cluster over HTTP, short texts only"), rate(f"sentence-transformers encode ({dtype})")
    if short_http and same_dtype:
        check(f"short texts over HTTP / sentence-transformers {dtype}", short_http / same_dtype, 1.5)
    rerank_http = rate(f"rerank: cluster /rerank over HTTP, {CLIENTS} clients")
    predict = next((row for name, row in by_name.items() if name.startswith("rerank: CrossEncoder.predict")), None)
    if rerank_http and predict:
        check(f"rerank over HTTP / {predict['name'].removeprefix('rerank: ')}", rerank_http / predict["texts_per_s"],
              1.0)
    sparse_http = rate(SPARSE_HTTP)
    encode = next((row for name, row in by_name.items() if name.startswith("sparse: SparseEncoder.encode")), None)
    if sparse_http and encode:
        check(f"sparse over HTTP / {encode['name'].removeprefix('sparse: ')}", sparse_http / encode["texts_per_s"], 1.0)
    sparse_memory = by_name.get(SPARSE_HTTP, {}).get("memory_mib")
    dense_memory = by_name.get(DENSE_FOR_SPARSE, {}).get("memory_mib")
    if sparse_memory and dense_memory:
        check("sparse replica's peak RSS / the dense model's replica's, over HTTP",
              sparse_memory["peak"] / dense_memory["peak"], 1.5, at_most=True)
    fp32_limit, onnx = rate("limit, short texts only, fp32"), rate("kernel: ONNX Runtime fp32 (exported here)")
    if fp32_limit and onnx:
        check("limit fp32 / ONNX Runtime fp32, short texts", fp32_limit / onnx, 1.0)
    cluster_one_text, cluster_short = rate(CLUSTER_ONE_TEXT), rate("cluster over HTTP, short texts only")
    for peer in dict.fromkeys(name.removeprefix("peer ").split(":")[0] for name in by_name if name.startswith("peer ")):
        one_text, short_texts = rate(peer_row(peer, ONE_TEXT)), rate(peer_row(peer, SHORT_TEXTS))
        peer_latency = by_name.get(peer_row(peer, LATENCY), {}).get("extra", {}).get("http")
        if cluster_one_text and one_text:
            check(f"{ONE_TEXT}: cluster req/s >= 1.0x peer {peer}'s", cluster_one_text / one_text, 1.0)
        if "http" in latency and peer_latency:
            check(f"single request p50: cluster <= peer {peer}'s", latency["http"]["p50_ms"] / peer_latency["p50_ms"],
                  1.0, at_most=True)
        if cluster_short and short_texts:
            check(f"{TEXTS_PER_REQUEST} texts a request: cluster >= 3x peer {peer}'s", cluster_short / short_texts, 3.0)
    return found


def format_table(report: dict) -> str:
    lines = [f"model {report['model']}: {report['short_texts']} short texts + {report['long_texts']} long "
             f"documents; medians of {report['repeats']} runs; /limit: wordpieces/s over the limit's on the same "
             "mix (the whole corpus, or the short texts)",
             f"{'contender':48} {'texts/s':>9} {'wordpieces/s':>13} {'/limit':>7} {'padding eff.':>12}  note"]
    for row in report["results"]:
        if row["extra"]:
            forward = row["extra"].get("in-process forward")
            for where, figures in row["extra"].items():
                times = (f" = {figures['p50_ms'] / forward['p50_ms']:.1f}x / {figures['p95_ms'] / forward['p50_ms']:.1f}x "
                         "the forward's p50" if forward and figures is not forward else "")
                lines.append(f"{row['name'] + ' (' + where + ')':48} p50 {figures['p50_ms']:.1f} ms, "
                             f"p95 {figures['p95_ms']:.1f} ms{times}")
            continue
        ratio = f"{row['ratio_to_limit']:.2f}" if "ratio_to_limit" in row else "-"
        efficiency = f"{row['padding_efficiency']:.3f}" if row["padding_efficiency"] is not None else "-"
        lines.append(f"{row['name']:48} {row['texts_per_s']:9.1f} {row['wordpieces_per_s']:13.0f} {ratio:>7} "
                     f"{efficiency:>12}  {row['note']}")
        if row["cores"]:
            lines.append("  CPU cores by process during that run: " +
                         ", ".join(f"{name} {cores:.2f}" for name, cores in row["cores"].items()))
        if row.get("memory_mib"):
            lines.append(f"  encoder replica RSS: {row['memory_mib']['before']:.0f} MiB before that run, peak "
                         f"{row['memory_mib']['peak']:.0f} MiB during it")
    if report.get("targets"):
        lines.append("targets:")
        for target in report["targets"]:
            lines.append(f"  {'met   ' if target['met'] else 'missed'} {target['target']}: {target['figure']:.2f} "
                         f"(goal {target['goal']})")
    return "\n".join(lines)


def bench_config(config: ClusterConfig, port: int) -> ClusterConfig:
    """The config with HTTP on a loopback port of the bench's own (its front kept), and gRPC on a free
    port unless the config names one."""
    grpc = config.grpc if config.grpc.port is not None else GRPCConfig(port=free_port())
    return config.model_copy(update={"http": config.http.model_copy(update={"host": "127.0.0.1", "port": port}),
                                     "grpc": grpc})
