"""TEI's gRPC API (``tei.v1``) on Serve's gRPC proxy: the proto against TEI's field numbers, and the
session cluster's answers against the reference model, the HTTP routes' answers and their errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from cluster.cli import grpc_exposure, main
from cluster.config import ClusterConfig, GRPCConfig, HTTPConfig
from deployments.protos import SERVICER_FUNCTIONS, tei_pb2, tei_pb2_grpc

SENTENCES = ["A man is eating food.", "Ray Serve scales Python services.",
             "Embeddings turn text into vectors that search engines compare."]

#: TEI's proto/tei.proto (v1.9.3): every field of the messages served here, as number, label and type.
TEI_FIELDS = {
    "InfoResponse": {"version": "1 string", "sha": "2 optional string", "docker_label": "3 optional string",
                     "model_id": "4 string", "model_sha": "5 optional string", "model_dtype": "6 string",
                     "model_type": "7 ModelType", "max_concurrent_requests": "8 uint32",
                     "max_input_length": "9 uint32", "max_batch_tokens": "10 uint32",
                     "max_batch_requests": "11 optional uint32", "max_client_batch_size": "12 uint32",
                     "tokenization_workers": "13 uint32"},
    "Metadata": {"compute_chars": "1 uint32", "compute_tokens": "2 uint32", "total_time_ns": "3 uint64",
                 "tokenization_time_ns": "4 uint64", "queue_time_ns": "5 uint64", "inference_time_ns": "6 uint64"},
    "EmbedRequest": {"inputs": "1 string", "truncate": "2 bool", "normalize": "3 optional bool",
                     "truncation_direction": "4 TruncationDirection", "prompt_name": "5 optional string",
                     "dimensions": "6 optional uint32"},
    "EmbedResponse": {"embeddings": "1 repeated float", "metadata": "2 Metadata"},
    "RerankRequest": {"query": "1 string", "texts": "2 repeated string", "truncate": "3 bool",
                      "raw_scores": "4 bool", "return_text": "5 bool", "truncation_direction": "6 TruncationDirection"},
    "Rank": {"index": "1 uint32", "text": "2 optional string", "score": "3 float"},
    "RerankResponse": {"ranks": "1 repeated Rank", "metadata": "2 Metadata"},
}
TYPE_NAMES = {getattr(FieldDescriptor, name): name.removeprefix("TYPE_").lower()
              for name in dir(FieldDescriptor) if name.startswith("TYPE_")}


def _described(field: FieldDescriptor) -> str:
    kind = (field.message_type or field.enum_type).name if field.message_type or field.enum_type else \
        TYPE_NAMES[field.type]
    label = "repeated " if field.is_repeated else "optional " if field.has_presence and not field.message_type else ""
    return f"{field.number} {label}{kind}"


def test_the_proto_has_tei_names_and_field_numbers():
    proto = tei_pb2.DESCRIPTOR
    assert proto.package == "tei.v1"
    for name, fields in TEI_FIELDS.items():
        assert {f.name: _described(f) for f in proto.message_types_by_name[name].fields} == fields, name
    assert not proto.message_types_by_name["InfoRequest"].fields
    assert {v.name: v.number for v in proto.enum_types_by_name["ModelType"].values} == {
        "MODEL_TYPE_EMBEDDING": 0, "MODEL_TYPE_CLASSIFIER": 1, "MODEL_TYPE_RERANKER": 2}
    assert {v.name: v.number for v in proto.enum_types_by_name["TruncationDirection"].values} == {
        "TRUNCATION_DIRECTION_RIGHT": 0, "TRUNCATION_DIRECTION_LEFT": 1}
    methods = {method.full_name: (method.input_type.name, method.output_type.name,
                                  method.client_streaming, method.server_streaming)
               for service in proto.services_by_name.values() for method in service.methods}
    assert methods == {"tei.v1.Info.Info": ("InfoRequest", "InfoResponse", False, False),
                       "tei.v1.Embed.Embed": ("EmbedRequest", "EmbedResponse", False, False),
                       "tei.v1.Rerank.Rerank": ("RerankRequest", "RerankResponse", False, False)}


def test_grpc_config_and_its_exposure_check():
    assert ClusterConfig().grpc.serve_options() is None
    options = GRPCConfig(port=50051).serve_options()
    assert options.port == 50051 and options.grpc_servicer_functions == SERVICER_FUNCTIONS
    assert len(options.grpc_servicer_func_callable) == 3
    with pytest.raises(ValueError, match="extra"):
        GRPCConfig(port=50051, host="0.0.0.0")
    # Ray binds gRPC on every interface: beside a loopback HTTP host only with an API key
    assert grpc_exposure(ClusterConfig()) is None
    assert "every interface" in grpc_exposure(ClusterConfig(grpc={"port": 50051}))
    assert grpc_exposure(ClusterConfig(grpc={"port": 50051}, api_key="k")) is None
    assert grpc_exposure(ClusterConfig(grpc={"port": 50051}, http=HTTPConfig(host="0.0.0.0"))) is None


def test_serve_refuses_grpc_beside_loopback_http_without_a_key(tmp_path, capsys):
    config = tmp_path / "cluster.yaml"
    config.write_text("grpc: {port: 50051}\n")
    assert main(["serve", "--config", str(config)]) == 2  # before Ray starts
    assert "Ray Serve binds gRPC on every interface" in capsys.readouterr().err


@pytest.fixture(scope="module")
def channel(grpc_target):
    with grpc.insecure_channel(grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def app(cluster_config) -> tuple:
    """The metadata that sends a call to the session's main app (two apps run: Serve needs it)."""
    return (("application", cluster_config.app_name),)


@pytest.fixture(scope="module")
def embed(channel, app):
    stub = tei_pb2_grpc.EmbedStub(channel)
    return lambda metadata=app, **fields: stub.Embed(tei_pb2.EmbedRequest(**fields), metadata=metadata, timeout=60)


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_embed_equals_the_reference_and_http(embed, http, minilm_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm_path, device="cpu").encode(SENTENCES)
    for text, expected in zip(SENTENCES, reference):
        answer = embed(inputs=text)
        vector = np.array(answer.embeddings)
        assert vector.shape == (384,)
        assert float(vector @ expected / np.linalg.norm(vector) / np.linalg.norm(expected)) >= 0.9999
        np.testing.assert_allclose(vector, http.post("/embed", json={"inputs": text}).json()[0], atol=1e-5)
        tokens = http.post("/tokenize", json={"inputs": [text]}).json()[0]["ids"]
        assert (answer.metadata.compute_chars, answer.metadata.compute_tokens) == (len(text), len(tokens))
        assert answer.metadata.total_time_ns >= answer.metadata.inference_time_ns > 0


def test_embed_options_as_on_http(embed, http, app):
    text = SENTENCES[1]
    raw = np.array(embed(inputs=text, normalize=False).embeddings)
    assert abs(np.linalg.norm(raw) - 1) > 0.01
    np.testing.assert_allclose(raw, http.post("/embed", json={"inputs": text, "normalize": False}).json()[0],
                               atol=1e-5)
    cut = np.array(embed(inputs=text, dimensions=64).embeddings)
    assert cut.shape == (64,) and np.linalg.norm(cut) == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(cut, http.post("/embed", json={"inputs": text, "dimensions": 64}).json()[0], atol=1e-5)
    long_text = " ".join(f"word{i}" for i in range(400))
    left = embed(inputs=long_text, truncate=True, truncation_direction=tei_pb2.TRUNCATION_DIRECTION_LEFT)
    expected = http.post("/embed", json={"inputs": long_text, "truncate": True, "truncation_direction": "left"})
    np.testing.assert_allclose(left.embeddings, expected.json()[0], atol=1e-5)
    assert left.metadata.compute_tokens == 256
    np.testing.assert_allclose(embed(inputs=text, prompt_name="query").embeddings, embed(inputs=text).embeddings,
                               atol=1e-5)
    bf16 = embed(metadata=app + (("model", "minilm-bf16"),), inputs=text).embeddings
    assert float(np.dot(bf16, embed(inputs=text).embeddings)) > 0.99


def test_info_answers_the_model(channel, app):
    stub = tei_pb2_grpc.InfoStub(channel)
    info = stub.Info(tei_pb2.InfoRequest(), metadata=app, timeout=60)
    assert (info.model_id, info.model_dtype, info.model_type) == ("all-MiniLM-L6-v2", "float32",
                                                                   tei_pb2.MODEL_TYPE_EMBEDDING)
    assert (info.max_input_length, info.max_client_batch_size, info.max_batch_tokens) == (256, 100, 8192)
    other = stub.Info(tei_pb2.InfoRequest(), metadata=app + (("model", "minilm-bf16"),), timeout=60)
    assert (other.model_id, other.model_dtype) == ("minilm-bf16", "bfloat16")
    error = _refused(lambda: stub.Info(tei_pb2.InfoRequest(), metadata=app + (("model", "nope"),), timeout=60))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_errors_carry_the_http_message_and_the_cluster_keeps_serving(embed, http, channel, app):
    cases = [({"inputs": ""}, {}, grpc.StatusCode.INVALID_ARGUMENT),
             ({"inputs": "x"}, {"model": "nope"}, grpc.StatusCode.NOT_FOUND),
             ({"inputs": "a " * 25_001}, {}, grpc.StatusCode.INVALID_ARGUMENT),  # 413 over HTTP
             ({"inputs": "x", "dimensions": 1000}, {}, grpc.StatusCode.INVALID_ARGUMENT),
             ({"inputs": "x", "prompt_name": "nope"}, {}, grpc.StatusCode.INVALID_ARGUMENT)]
    for fields, metadata, code in cases:
        error = _refused(lambda: embed(metadata=app + tuple(metadata.items()), **fields))
        expected = http.post("/embed", json=fields | metadata).json()["error"]["message"]
        assert (error.code(), error.details()) == (code, expected)
    missing = channel.unary_unary("/tei.v1.Embed/EmbedSparse")
    assert _refused(lambda: missing(b"", metadata=app, timeout=60)).code() == grpc.StatusCode.UNIMPLEMENTED
    assert len(embed(inputs=SENTENCES[0]).embeddings) == 384


def test_the_api_key_is_required(channel, api_key, guarded_config):
    stub = tei_pb2_grpc.EmbedStub(channel)
    guarded = (("application", guarded_config.app_name),)
    for metadata in ((), (("authorization", "Bearer wrong-key"),), (("authorization", api_key),)):
        error = _refused(lambda: stub.Embed(tei_pb2.EmbedRequest(inputs="x"), metadata=guarded + metadata, timeout=60))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in error.details()
    for metadata in ((("authorization", f"Bearer {api_key}"),), (("x-api-key", api_key),)):
        assert len(stub.Embed(tei_pb2.EmbedRequest(inputs="x"), metadata=guarded + metadata, timeout=60).embeddings) \
            == 32


def test_rerank_as_on_http(channel, http, app):
    query, texts = "Who scales services?", SENTENCES
    answer = tei_pb2_grpc.RerankStub(channel).Rerank(
        tei_pb2.RerankRequest(query=query, texts=texts, return_text=True), metadata=app, timeout=60)
    expected = http.post("/rerank", json={"query": query, "texts": texts, "return_text": True}).json()
    assert [(r.index, r.text) for r in answer.ranks] == [(r["index"], r["text"]) for r in expected]
    np.testing.assert_allclose([r.score for r in answer.ranks], [r["score"] for r in expected], atol=1e-5)
    plain = tei_pb2_grpc.RerankStub(channel).Rerank(tei_pb2.RerankRequest(query=query, texts=texts), metadata=app,
                                                    timeout=60)
    assert not any(rank.HasField("text") for rank in plain.ranks)


def test_a_message_over_max_body_bytes_is_refused(channel, api_key, guarded_config):
    """gRPC meets HTTP's body limit (the guarded app's 64 KiB): Serve's proxy alone takes up to 2 GiB."""
    stub = tei_pb2_grpc.RerankStub(channel)
    guarded = (("application", guarded_config.app_name), ("authorization", f"Bearer {api_key}"))
    texts = ["a few words of a longer document here"] * 2000  # about 80 KB: within every other limit of the app
    error = _refused(lambda: stub.Rerank(tei_pb2.RerankRequest(query="q", texts=texts), metadata=guarded,
                                         timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_body_bytes={guarded_config.limits.max_body_bytes}" in error.details()
    assert len(stub.Rerank(tei_pb2.RerankRequest(query="q", texts=texts[:10]), metadata=guarded,
                           timeout=60).ranks) == 10
