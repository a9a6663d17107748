"""The ``embedding-cluster`` command line."""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.config import ClusterConfig, ModelConfig, load_config
from cluster.ray_connect import ClusterAuthError, join_ray
from deployments.errors import ModelLoadError

if TYPE_CHECKING:
    from cluster.bench import Peer
    from cluster.bulk_job import BulkSummary

logger = logging.getLogger("embedding_cluster")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _config_from_args(args: argparse.Namespace) -> ClusterConfig:
    config = load_config(args.config)
    overrides = (("host", args.host), ("port", args.port), ("front", getattr(args, "front", None)))
    http = config.http.model_copy(update={k: v for k, v in overrides if v is not None})
    return config.model_copy(update={"http": http}).with_api_key(args.api_key)


def deploy_failure(app_name: str, error: Exception) -> str:
    """One line that says why an app failed to deploy: a replica's ``ModelLoadError`` out of its
    deployment's status (which carries the replica's traceback), else Serve's message."""
    from ray import serve

    marker = f"{ModelLoadError.__name__}: "
    application = serve.status().applications.get(app_name)
    for deployment in (application.deployments.values() if application else ()):
        if marker in deployment.message:
            return deployment.message[deployment.message.rindex(marker) + len(marker):].splitlines()[0]
    return str(error).splitlines()[0]


def grpc_exposure(config: ClusterConfig) -> str | None:
    """Why ``config``'s gRPC cannot be served as it stands, or ``None``. Ray Serve binds its gRPC
    listeners on every interface (``[::]``) whatever ``http.host``: the Python proxy's port, and under
    HAProxy (whose own gRPC frontend binds ``http.host``) the head's fallback proxy and every ingress
    replica's direct gRPC server. Beside a loopback HTTP host that would open the API to the network
    unasked: refused without an API key, warned with one."""
    if config.grpc.port is None or config.http.host not in LOOPBACK_HOSTS:
        return None
    if not config.api_key:
        return (f"grpc.port {config.grpc.port} would be reachable from other machines: Ray Serve binds gRPC on "
                f"every interface, whatever http.host ({config.http.host}); set an API key (--api-key, "
                "EMBEDDING_CLUSTER_API_KEY or api_key), which gRPC calls must send too, or set http.host to a "
                "non-loopback address to serve both openly")
    logger.warning("gRPC port %d is reachable from other machines (Ray Serve binds gRPC on every interface, "
                   "whatever http.host %s); calls need the API key", config.grpc.port, config.http.host)
    return None


def http_exposure(config: ClusterConfig, insecure: bool) -> str | None:
    """Why ``config``'s HTTP cannot be served as it stands, or ``None``: a non-loopback host opens the
    API to other machines, refused without an API key unless ``insecure`` says so (then warned)."""
    if config.http.host in LOOPBACK_HOSTS:
        return None
    if not config.api_key and not insecure:
        return (f"http.host {config.http.host} makes the API reachable from other machines, and it has no API key: "
                "set one (--api-key, EMBEDDING_CLUSTER_API_KEY or api_key), or pass --insecure to serve it open")
    logger.warning("HTTP binds %s: the API is reachable from other machines%s", config.http.host,
                   "" if config.api_key else " and has no API key (--insecure)")
    return None


def _deploy_in_background(deploy: Callable[[], object]) -> concurrent.futures.Future:
    """``deploy()`` (``serve.run``, which waits until every replica runs) on a daemon thread, so that the
    main thread keeps answering Ctrl-C while replicas start or wait for resources."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(deploy())
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which decides
            future.set_exception(error)

    threading.Thread(target=run, name="deploy", daemon=True).start()
    return future


def serve_command(args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy the app, serve until SIGINT/SIGTERM, then shut down cleanly."""
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.front import apply_front
    from deployments.weight_store import release_weights

    try:
        config = _config_from_args(args).resolved()
    except ValueError as error:
        print(f"embedding-cluster serve: {error}", file=sys.stderr)
        return 2
    if (problem := http_exposure(config, args.insecure)) is not None:
        print(f"embedding-cluster serve: {problem}", file=sys.stderr)
        return 2
    if (problem := grpc_exposure(config)) is not None:
        print(f"embedding-cluster serve: {problem}", file=sys.stderr)
        return 2
    joined = args.address is not None
    try:
        front = "the cluster's own" if joined else apply_front(config.http.front)
    except ValueError as error:
        print(f"embedding-cluster serve: {error}", file=sys.stderr)
        return 2
    if not joined:  # Serve's gRPC servers take messages up to 2 GiB unless told otherwise
        os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(config.limits.max_body_bytes))
    try:
        join_ray(args.address or "local", namespace="embedding-cluster", log_to_driver=args.verbose)
    except ClusterAuthError as error:
        print(f"embedding-cluster serve: {error}", file=sys.stderr)
        return 2
    if not joined:
        cpus = ray.cluster_resources().get("CPU", 1)
        try:
            config = config.fit_local_cpus(cpus).with_local_threads(int(cpus))
        except ValueError as error:
            ray.shutdown()
            print(f"embedding-cluster serve: {error}", file=sys.stderr)
            return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.http.host, "port": config.http.port},
                    grpc_options=config.grpc.serve_options())
        logger.info("deploying %d model(s): %s", len(config.models), ", ".join(m.name for m in config.models))
        deployment = _deploy_in_background(lambda: serve.run(build_app(config), name=config.app_name,
                                                             route_prefix=config.route_prefix, blocking=False))
        while not deployment.done() and not stop.wait(0.5):
            pass  # Ctrl-C while replicas start (or wait for resources) stops at once
        if deployment.done():
            if isinstance(error := deployment.exception(), RuntimeError):
                print(f"embedding-cluster serve: {deploy_failure(config.app_name, error)}", file=sys.stderr,
                      flush=True)
                return 2
            deployment.result()
            grpc = "" if config.grpc.port is None else f", gRPC (TEI's tei.v1) on port {config.grpc.port}"
            print(f"embedding-cluster ready: http://{config.http.host}:{config.http.port}{grpc} "
                  f"(front: {front}; docs at /docs; Ctrl-C to stop)", flush=True)
            stop.wait()
        else:
            logger.info("stopping before every model was ready")
        logger.info("stopping: draining requests in flight")
    finally:
        # deleting the app first lets every replica finish the requests it holds (Serve's graceful
        # shutdown); serve.shutdown alone would stop the HTTP proxy under them
        serve.delete(config.app_name)
        if joined:
            release_weights(f"{config.app_name}/")
        else:
            serve.shutdown()
        ray.shutdown()
    print("embedding-cluster stopped", flush=True)
    return 0


def _bulk_command(args: argparse.Namespace, prepare: Callable[[ModelConfig], Callable[[], BulkSummary]]) -> int:
    """A bulk job (``embed``, ``score``): INPUT files -> OUTPUT parquet parts, with progress and a
    summary line. ``prepare`` checks the config's model for the job (``KeyError``/``ValueError``
    before Ray starts) and gives back the job to run on Ray."""
    import ray

    name = f"embedding-cluster {args.command}"
    config = load_config(args.config)
    try:
        job = prepare(config.model(args.model) if args.model else config.models[0])
    except (KeyError, ValueError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    try:
        join_ray(args.address or "local", namespace="embedding-cluster", log_to_driver=args.verbose)
    except ClusterAuthError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    try:
        summary = job()
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(summary.line(), flush=True)
    if summary.rows_out != summary.rows_in:
        print(f"{name}: {summary.rows_in - summary.rows_out} rows are missing from the output", file=sys.stderr)
        return 1
    return 0


def _bulk_options(args: argparse.Namespace) -> dict:
    """The options every bulk job takes, from the command line."""
    return {"id_column": args.id_column, "resume": args.resume, "rows_per_part": args.rows_per_part,
            "batch_size": args.batch_size}


def embed_command(args: argparse.Namespace) -> int:
    """The bulk embedding job."""
    from cluster.bulk import Chunking
    from cluster.bulk_job import run_bulk_job
    from deployments.validation import quantization_ranges

    if args.sparse:
        return _sparse_command(args)

    def prepare(model: ModelConfig) -> Callable[[], BulkSummary]:
        if model.kind == "sparse":
            raise ValueError(f"model {model.name!r} is a sparse (SPLADE) model: pass --sparse")
        if args.task is not None or args.max_active_dims is not None:
            raise ValueError("--task and --max-active-dims are options of --sparse")
        model = model.resolved()
        model.prompt(args.prompt_name, args.prompt)
        chunks = Chunking(args.chunk_size, args.chunk_overlap, args.chunk_context) if args.chunks else None
        quantization_ranges(model, args.precision, None, None, None)  # int8 without ranges: exit 2 before Ray
        return lambda: run_bulk_job(args.input, args.output, model, text_column=args.text_column, level=args.level,
                                    truncate=args.truncate, prompt_name=args.prompt_name, prompt=args.prompt,
                                    chunks=chunks, precision=args.precision, encode_actors=args.encode_actors,
                                    limits=load_config(args.config).limits, **_bulk_options(args))

    return _bulk_command(args, prepare)


def _sparse_command(args: argparse.Namespace) -> int:
    """``embed --sparse``: the bulk SPLADE job."""
    from cluster.bulk_sparse import check_sparse_options, run_sparse_job

    def prepare(model: ModelConfig) -> Callable[[], BulkSummary]:
        dense_only = [flag for flag, used in (("--level wordpiece", args.level != "pooled"), ("--chunks", args.chunks),
                                              ("--precision", args.precision != "float32")) if used]
        if dense_only:
            raise ValueError(f"{', '.join(dense_only)} cannot be combined with --sparse (dense vectors only)")
        check_sparse_options(model, args.prompt_name, args.prompt, args.task, args.max_active_dims)
        return lambda: run_sparse_job(args.input, args.output, model, text_column=args.text_column,
                                      truncate=args.truncate, prompt_name=args.prompt_name, prompt=args.prompt,
                                      task=args.task, max_active_dims=args.max_active_dims,
                                      encode_actors=args.encode_actors, **_bulk_options(args))

    return _bulk_command(args, prepare)


def score_command(args: argparse.Namespace) -> int:
    """The bulk reranking job."""
    from cluster.bulk_score import DEFAULT_MAX_WINDOWS, check_score_options, run_score_job

    max_windows = DEFAULT_MAX_WINDOWS if args.max_windows is None else args.max_windows

    def prepare(model: ModelConfig) -> Callable[[], BulkSummary]:
        check_score_options(model, args.query_column, args.document_column, args.aggregate, max_windows)
        return lambda: run_score_job(args.input, args.output, model, query_column=args.query_column,
                                     document_column=args.document_column, truncate=args.truncate,
                                     aggregate=args.aggregate, raw_scores=args.raw_scores, max_windows=max_windows,
                                     score_actors=args.encode_actors, **_bulk_options(args))

    return _bulk_command(args, prepare)


def bench_command(args: argparse.Namespace) -> int:
    """Measure every contender on one corpus; print the table, optionally write JSON."""
    import json

    from cluster.bench import PeerError, bench_config, default_corpus, format_table, load_corpus, run_bench
    from cluster.front import free_port

    names = [peer.name for peer in args.peer]
    twice = sorted({name for name in names if names.count(name) > 1})
    refusal = ("--peer is measured against the cluster: drop --no-cluster" if args.peer and args.no_cluster else
               f"--peer names must differ: {', '.join(twice)} given twice" if twice else None)
    if refusal:
        print(f"embedding-cluster bench: {refusal}", file=sys.stderr)
        return 2
    config = load_config(args.config)
    model = config.model(args.model) if args.model else config.models[0]
    short, long, repeats, latency = (48, 3, 1, 10) if args.quick else (1200, 60, 3, 100)
    corpus = load_corpus(args.corpus) if args.corpus else default_corpus(short, long)
    config = bench_config(config.model_copy(update={"models": [model]}), free_port())
    config = config.with_local_threads(os.cpu_count() or 1)
    try:
        report = run_bench(corpus, config, repeats=repeats, latency_requests=latency, cluster=not args.no_cluster,
                           reranker=args.reranker, sparse=args.sparse, peers=args.peer)
    except PeerError as error:
        print(f"embedding-cluster bench: {error}", file=sys.stderr)
        return 2
    print(format_table(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _peer_argument(value: str) -> Peer:
    """A ``--peer`` value, refused as argparse refuses a bad value (usage, the reason, exit 2)."""
    from cluster.bench import parse_peer

    try:
        return parse_peer(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def config_command(args: argparse.Namespace) -> int:
    """Print the default config (or the given one, validated) as YAML."""
    sys.stdout.write(load_config(args.config).to_yaml())
    return 0


def _add_bulk_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every bulk job takes."""
    parser.add_argument("input", help="a .jsonl/.json/.parquet/.csv/.txt file, a folder or a glob of them")
    parser.add_argument("output", help="a folder for the parquet parts")
    parser.add_argument("--model", help="the config's model to use (default: its first)")
    parser.add_argument("--config", help="a ClusterConfig YAML file (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--id-column", help="the rows' id column, kept and used by --resume (default: id)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the complete parts an interrupted run left in OUTPUT and run the rest")
    parser.add_argument("--address", help="run on this Ray cluster (HEAD:PORT or 'auto') instead of a local one")
    parser.add_argument("--rows-per-part", type=int, default=10_000, help="rows per parquet part")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per ray.data batch")
    parser.add_argument("--encode-actors", type=int,
                        help="model actors (default: one per GPU, or per model num_cpus free)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedding-cluster",
                                     description="Transformer embeddings served by a Ray Serve cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the replicas' logs")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the cluster and serve HTTP until Ctrl-C")
    serve.add_argument("--config", help="a ClusterConfig YAML file (default: the bundled all-MiniLM-L6-v2)")
    serve.add_argument("--host", help="HTTP host (default 127.0.0.1; 0.0.0.0 exposes the API)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--address", help="join this Ray cluster (HEAD:PORT or 'auto') instead of starting one")
    serve.add_argument("--front", choices=["auto", "haproxy", "proxy"],
                       help="what takes the HTTP port: Ray Serve's HAProxy ingress or its Python proxy (default: the "
                            "config's http.front, auto: HAProxy when its binary is installed)")
    serve.add_argument("--api-key", help="require this key on every route but /health "
                                         "(default: $EMBEDDING_CLUSTER_API_KEY)")
    serve.add_argument("--insecure", action="store_true",
                       help="serve a non-loopback host without an API key (refused otherwise)")
    serve.set_defaults(func=serve_command)

    embed = commands.add_parser("embed", help="bulk job: embed a corpus into parquet with ray.data")
    _add_bulk_arguments(embed)
    embed.add_argument("--text-column", default="text", help="the column holding the texts (default: text)")
    embed.add_argument("--level", choices=["pooled", "wordpiece"], default="pooled")
    embed.add_argument("--truncate", action="store_true", help="keep only max_length wordpieces of long texts")
    embed.add_argument("--prompt-name", help="one of the model's prompts (default: its default prompt, if any)")
    embed.add_argument("--prompt", help="a literal prompt put before every text")
    embed.add_argument("--chunks", action="store_true",
                       help="one row per chunk of each text (chunk_index, chunk_start, chunk_end, chunk_text)")
    embed.add_argument("--chunk-size", type=int, default=128, help="most wordpieces in a chunk (default 128)")
    embed.add_argument("--chunk-overlap", type=int, default=0, help="wordpieces a chunk shares with the last")
    embed.add_argument("--chunk-context", choices=["document", "chunk"], default="document",
                       help="document: late chunking (each chunk pooled from its whole text); chunk: each alone")
    embed.add_argument("--precision", choices=["float32", "int8", "uint8", "binary", "ubinary"], default="float32",
                       help="quantize the vectors as sentence-transformers' quantize_embeddings: int8/uint8 columns "
                            "of dim bytes (in the model's quantization_ranges or calibration_corpus ranges), "
                            "binary/ubinary of dim/8 (default: float32)")
    embed.add_argument("--sparse", action="store_true",
                       help="a sparse (SPLADE) model's vectors as sparse_indices (list<int32>) and sparse_values "
                            "(list<float32>) columns")
    embed.add_argument("--task", choices=["query", "document"],
                       help="with --sparse: the route (and prompt) of encode_query / encode_document")
    embed.add_argument("--max-active-dims", type=int, help="with --sparse: keep each vector's k largest weights")
    embed.set_defaults(func=embed_command)

    score = commands.add_parser("score", help="bulk job: score (query, document) pairs with a reranker into "
                                              "parquet with ray.data")
    _add_bulk_arguments(score)
    score.add_argument("--query-column", default="query", help="the column holding the queries (default: query)")
    score.add_argument("--document-column", default="text",
                       help="the column holding the documents (default: text)")
    score.add_argument("--truncate", action="store_true",
                       help="cut long pairs as CrossEncoder.predict does (longest_first) instead of reading windows")
    score.add_argument("--aggregate", choices=["max", "first", "mean"], default="max",
                       help="a long document's score from its windows' (default: max, the best window)")
    score.add_argument("--raw-scores", action="store_true", help="the model's logits, without its activation")
    score.add_argument("--max-windows", type=int,
                       help="windows one document may be read in; a row that needs more gets an error "
                            "(default: 256)")
    score.set_defaults(func=score_command)

    bench = commands.add_parser("bench", help="measure the cluster against the in-process limit and others")
    bench.add_argument("--corpus", help="a .jsonl file with a 'text' field (default: installed docstrings)")
    bench.add_argument("--model", help="the config's model to measure (default: its first)")
    bench.add_argument("--config", help="a ClusterConfig YAML file (default: the bundled all-MiniLM-L6-v2)")
    bench.add_argument("--quick", action="store_true", help="a small corpus and one run of each")
    bench.add_argument("--no-cluster", action="store_true", help="only the in-process contenders")
    bench.add_argument("--reranker", help="a cross-encoder folder for the rerank rows (default: the model's "
                                          "transformer with an untrained one-label head)")
    bench.add_argument("--sparse", help="a SparseEncoder (SPLADE) folder for the sparse rows (default: the model's "
                                        "transformer with an untrained masked-LM head)")
    bench.add_argument("--peer", action="append", default=[], type=_peer_argument, metavar="NAME=URL[=MODEL]",
                       help="also measure this embedding server, already running (Infinity, TEI), on the cluster's "
                            "rows: one text a request, single-request latency, 16 texts a request; URL its "
                            "OpenAI-style embeddings route, sent {\"model\": MODEL, \"input\": [...]} (MODEL "
                            "default: the bench model's name); repeatable")
    bench.add_argument("--json", help="also write the report to this file")
    bench.set_defaults(func=bench_command)

    config = commands.add_parser("config", help="print the default config as YAML")
    config.add_argument("--config", help="validate and print this config file instead")
    config.set_defaults(func=config_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
