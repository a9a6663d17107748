"""SPLADE in the library: ``SparseEncoderModel`` against sentence-transformers' ``SparseEncoder``.

On every folder of ``sparse_folders.SPARSE_SETUPS``: vectors equal ``SparseEncoder(folder).encode``
to 1e-5 at fp32 with the same non-zero set (short inputs, truncated long ones, prompts);
long inputs, folded, equal SpladePooling over the plain ``transformers`` masked-LM run on each
segment alone (the segments cut from the tokenizer's own wordpieces, not by the project's fold);
``max_active_dims`` and ``decode`` equal sentence-transformers'; inference-free SPLADE (a ``Router``)
equals ``encode_query`` / ``encode_document`` / ``encode``; refused folders name the module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from sparse_folders import SPARSE_SETUPS, build_sparse, masked_lm_reference, set_module_type, write_json
from st_folders import LONG_TEXTS, TEXTS

from embedder.model_kind import read_model_kind
from embedder.sentence_folder import UnsupportedModelError
from embedder.sparse_encoder import (
    STATIC_TOP_K_ROWS,
    SparseEncoderModel,
    is_masked_lm_folder,
    is_sparse_encoder_folder,
    read_sparse_folder,
)

ATOL = 1e-5
NAMES = [spec.name for spec in SPARSE_SETUPS]
PROMPTS = {spec.name: spec.prompts for spec in SPARSE_SETUPS}


@pytest.fixture(scope="module")
def sparse_folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    return build_sparse(tmp_path_factory.mktemp("sparse-folders"), minilm_path)


_references: dict[str, object] = {}
_models: dict[str, SparseEncoderModel] = {}


def reference(folder: str):
    from sentence_transformers import SparseEncoder

    if folder not in _references:
        _references[folder] = SparseEncoder(folder, device="cpu")
    return _references[folder]


def ours(folder: str) -> SparseEncoderModel:
    if folder not in _models:
        _models[folder] = SparseEncoderModel(folder, device="cpu")
    return _models[folder]


def st_encode(folder: str, texts, **kwargs) -> np.ndarray:
    return reference(folder).encode(list(texts), convert_to_tensor=True, **kwargs).to_dense().numpy()


def assert_same_vectors(actual: np.ndarray, expected: np.ndarray, rtol: float = 0.0) -> float:
    """The same non-zero set, and values within ``ATOL`` (plus ``rtol`` of the value: float32 sums
    over hundreds of wordpieces, added up segment by segment, round differently)."""
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual != 0, expected != 0)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=rtol)
    return float(np.abs(actual - expected).max())


def test_folders_are_sparse_encoders(sparse_folders, tiny_bert_path):
    for name, folder in sparse_folders.items():
        assert is_sparse_encoder_folder(folder) == (name != "plain-masked-lm")
        assert is_masked_lm_folder(folder) == (name == "plain-masked-lm")
    assert not is_sparse_encoder_folder(tiny_bert_path) and not is_masked_lm_folder(tiny_bert_path)
    assert read_model_kind(sparse_folders["plain-masked-lm"]) == "embedding"  # sparse only with pooling: splade
    assert read_sparse_folder(sparse_folders["bert-splade-sum"]).pooling_strategy == "sum"
    assert read_sparse_folder(sparse_folders["bert-log1p-relu"]).activation_function == "log1p_relu"
    assert read_sparse_folder(sparse_folders["st5-paths"]).max_active_dims == 24


@pytest.mark.parametrize("name", NAMES)
def test_equal_to_sparse_encoder(sparse_folders, name):
    """Short inputs and truncated long ones, the folder's default prompt, then each of its prompts."""
    folder = sparse_folders[name]
    texts = TEXTS + LONG_TEXTS
    model = ours(folder)
    assert model.max_length == reference(folder).max_seq_length
    assert_same_vectors(model.encode(texts, truncate=True).toarray(), st_encode(folder, texts))
    for prompt_name in PROMPTS[name]:
        assert_same_vectors(model.encode(TEXTS, prompt_name=prompt_name).toarray(),
                            st_encode(folder, TEXTS, prompt_name=prompt_name))
    assert_same_vectors(model.encode(TEXTS, prompt="search: ").toarray(),
                        st_encode(folder, TEXTS, prompt="search: "))


@pytest.mark.parametrize("name", ["bert-splade-max", "bert-splade-sum", "bert-log1p-relu", "distilbert-splade",
                                  "plain-masked-lm"])
def test_long_inputs_equal_masked_lm_over_segments(sparse_folders, name):
    folder = sparse_folders[name]
    model = ours(folder)
    prompt = model.prompt()
    vectors = model.encode(LONG_TEXTS).toarray()
    assert model.fold(LONG_TEXTS).segments_per_input.min() >= 3
    for text, vector in zip(LONG_TEXTS, vectors):
        assert_same_vectors(vector[None], masked_lm_reference(folder, text, model.max_length, prompt)[None],
                            rtol=1e-5 if model.pooling_strategy == "sum" else 0.0)


def test_small_budgets_give_the_same_vectors(sparse_folders):
    """Sub-batches of a few segments and groups of one or two inputs: the same vectors, and a text
    alone equals the text among others (to float32 rounding: other padding widths change the
    transformer's sums in the last bits)."""
    model = ours(sparse_folders["bert-splade-sum"])
    texts = LONG_TEXTS + TEXTS
    full = model.encode(texts).toarray()
    assert_same_vectors(model.encode(texts, max_batch_tokens=50, max_inputs_per_group=2).toarray(), full, rtol=1e-5)
    assert_same_vectors(model.encode(texts[1]).toarray(), full[1:2], rtol=1e-5)


@pytest.mark.parametrize("name", ["bert-splade-max", "st5-paths"])
def test_max_active_dims_and_decode(sparse_folders, name):
    folder = sparse_folders[name]
    model = ours(folder)
    for k in (1, 7, 50):
        assert_same_vectors(model.encode(TEXTS, max_active_dims=k).toarray(),
                            st_encode(folder, TEXTS, max_active_dims=k))
    matrix = model.encode(TEXTS)
    expected = reference(folder).encode(TEXTS, convert_to_tensor=True)
    for row, reference_row in zip(matrix, expected):
        for top_k in (None, 5):
            mine, theirs = model.decode(row, top_k=top_k), reference(folder).decode(reference_row, top_k=top_k)
            assert [token for token, _ in mine] == [token for token, _ in theirs]
            np.testing.assert_allclose([w for _, w in mine], [w for _, w in theirs], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="max_active_dims"):
        model.encode(TEXTS, max_active_dims=0)


def test_empty_and_one_text(sparse_folders):
    model = ours(sparse_folders["bert-splade-max"])
    assert model.encode([]).shape == (0, model.vocab_size)
    one = model.encode("A man is eating food.")
    assert one.shape == (1, model.vocab_size) and one.dtype == np.float32
    np.testing.assert_array_equal(np.diff(one.indices) > 0, True)


@pytest.mark.parametrize("change, message", [
    ("sentence_transformers.sparse_encoder.modules.sparse_auto_encoder.SparseAutoEncoder", "SparseAutoEncoder"),
    ("sentence_transformers.base.modules.router.Router", "Router"),
    ("sentence_transformers.sentence_transformer.modules.pooling.Pooling", "Pooling"),
])
def test_unsupported_modules_are_refused(sparse_folders, tmp_path, change, message):
    folder = tmp_path / "refused"
    shutil.copytree(sparse_folders["bert-splade-max"], folder)
    set_module_type(folder, 1, change)
    with pytest.raises(UnsupportedModelError, match=message) as error:
        SparseEncoderModel(str(folder), device="cpu")
    assert str(folder) in str(error.value)


def test_feature_extraction_transformer_is_refused(sparse_folders, tmp_path):
    folder = tmp_path / "feature-extraction"
    shutil.copytree(sparse_folders["st6-saved"], folder)
    write_json(folder / "sentence_bert_config.json", {"transformer_task": "feature-extraction"})
    with pytest.raises(UnsupportedModelError, match="fill-mask"):
        read_sparse_folder(str(folder))


def test_inference_free_routes_equal_sparse_encoder(sparse_folders):
    """The Router folder: the static query route (token presence times its weight, the query prompt),
    the masked-LM document route, the default route (document), and max_active_dims on each."""
    folder = sparse_folders["inference-free"]
    model = ours(folder)
    st = reference(folder)
    assert model.folder.routes == ("document", "query") and model.max_length == 40
    texts = TEXTS + LONG_TEXTS
    queries = model.encode_query(texts).toarray()
    assert_same_vectors(queries, st.encode_query(texts, convert_to_tensor=True).to_dense().numpy())
    assert (queries != 0).sum(1).max() < 60
    assert_same_vectors(model.encode_document(texts, truncate=True).toarray(),
                        st.encode_document(texts, convert_to_tensor=True).to_dense().numpy())
    assert_same_vectors(model.encode(texts, truncate=True).toarray(), st_encode(folder, texts))
    assert_same_vectors(model.encode(texts, task="query", prompt_name="query").toarray(), queries)
    assert_same_vectors(model.encode_query(TEXTS, max_active_dims=3).toarray(),
                        st.encode_query(TEXTS, convert_to_tensor=True, max_active_dims=3).to_dense().numpy())
    many = [f"{text} {number}" for number in range(30) for text in TEXTS]  # more rows than one top-k group
    assert len(many) > STATIC_TOP_K_ROWS
    assert_same_vectors(model.encode_query(many, max_active_dims=3).toarray(),
                        st.encode_query(many, convert_to_tensor=True, max_active_dims=3).to_dense().numpy())
    long_documents = model.encode_document(LONG_TEXTS).toarray()
    for text, vector in zip(LONG_TEXTS, long_documents):
        assert_same_vectors(vector[None], masked_lm_reference(folder, text, 40, None)[None])
    with pytest.raises(ValueError, match="unknown task"):
        model.encode(TEXTS, task="passage")


def test_router_with_route_mappings_is_refused(sparse_folders, tmp_path):
    import json

    folder = tmp_path / "mapped"
    shutil.copytree(sparse_folders["inference-free"], folder)
    config = json.loads((folder / "router_config.json").read_text())
    config["parameters"]["route_mappings"] = {"query|text": "query"}
    write_json(folder / "router_config.json", config)
    with pytest.raises(UnsupportedModelError, match="route_mappings"):
        read_sparse_folder(str(folder))


#: Encodes one long text in a fresh process and prints how much its peak RSS grew (MiB), the
#: text's wordpieces and its vector's non-zeros.
PEAK_SCRIPT = """
import resource, sys
from embedder.sparse_encoder import SparseEncoderModel
model = SparseEncoderModel(sys.argv[1], device="cpu", dtype="float32")
text = open(sys.argv[2]).read()
model.encode(["warm up"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
matrix = model.encode([text])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024, model.fold([text]).num_wordpieces[0], matrix.nnz)
"""


def test_a_long_input_never_holds_all_its_logits(sparse_folders, tmp_path):
    """30,000 wordpieces against a 30k vocabulary would be 3.8 GB of float32 logits at once; reduced
    sub-batch by sub-batch (2048 tokens: 250 MB of logits), the peak RSS grows by at most 1.25 sub-batches
    of logits plus 32 MiB."""
    text = tmp_path / "long.txt"
    text.write_text(" ".join(LONG_TEXTS * 40))
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, sparse_folders["bert-splade-max"], str(text)],
                          capture_output=True, text=True, timeout=300, check=True)
    grown_mib, wordpieces, non_zeros = (float(value) for value in done.stdout.split())
    vocabulary = 30522
    assert wordpieces > 30_000 and non_zeros > 0
    sub_batch_mib = 2048 * vocabulary * 4 / 2**20
    assert grown_mib <= 1.25 * sub_batch_mib + 32, (grown_mib, sub_batch_mib)
    assert grown_mib < wordpieces * vocabulary * 4 / 2**20 / 10
