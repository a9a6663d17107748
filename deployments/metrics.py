"""The cluster's Prometheus metrics (``ray.serve.metrics``), exported by every Ray node
on its metrics port (``ray start --metrics-export-port``; see the README)."""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
TOKEN_BOUNDARIES = [16, 64, 256, 1024, 4096, 16384, 65536]
MERGED_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class IngressMetrics:
    """Requests, inputs and wordpieces per model and route."""

    def __init__(self) -> None:
        tags = ("model", "route")
        self.requests = metrics.Counter("embedding_requests", "Requests answered, by status.",
                                        tag_keys=("model", "route", "status"))
        self.inputs = metrics.Counter("embedding_inputs", "Inputs (texts or word lists) embedded.", tag_keys=tags)
        self.wordpieces = metrics.Counter("embedding_wordpieces", "Wordpieces of the inputs embedded.",
                                          tag_keys=tags)
        self.latency = metrics.Histogram("embedding_request_latency_ms", "Request latency at the ingress.",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags)
        self.requests_per_call = metrics.Histogram(
            "embedding_requests_per_encoder_call", "Small requests one merged encoder call carried.",
            boundaries=MERGED_BOUNDARIES, tag_keys=("model",))


class EncoderMetrics:
    """Batches as the encoder runs them."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self.batch_tokens = metrics.Histogram("embedding_batch_tokens", "Real tokens per encoder batch.",
                                              boundaries=TOKEN_BOUNDARIES, tag_keys=("model",))
        self.padding_efficiency = metrics.Gauge("embedding_padding_efficiency",
                                                "Real / computed tokens of the last batch.", tag_keys=("model",))
        self.queue_wait = metrics.Histogram("embedding_queue_wait_ms",
                                            "Time a request waits in the encoder before its batch runs.",
                                            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model",))
        self.batch_latency = metrics.Histogram("embedding_batch_latency_ms", "Time one encoder batch takes.",
                                               boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model",))
