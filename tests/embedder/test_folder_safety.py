"""Model folders are data: no setting read from one runs the folder's own code.

Each folder here asks for ``trust_remote_code`` in its ``sentence_bert_config.json`` and names,
in its ``config.json`` ``auto_map``, a Python file that writes a marker file when imported. The
first test proves the folder is a real exploit (the marker appears when a caller trusts it);
the others load it through every reader and loader of the project and find no marker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reranker_folders import st6_identity
from sparse_folders import bert_splade_max
from st_folders import bert_mean

REMOTE_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import BertConfig

class RemoteConfig(BertConfig):
    model_type = "bert"
'''


def make_hostile(folder: Path, marker: Path) -> str:
    """Give a built folder remote code, and settings in its folder files that ask to run it."""
    (folder / "remote_code.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "remote_code.RemoteConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    settings_path = folder / "sentence_bert_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    settings["config_kwargs"] = {"trust_remote_code": True}
    settings["model_kwargs"] = {"trust_remote_code": True}
    settings["tokenizer_args"] = {"trust_remote_code": True}
    settings_path.write_text(json.dumps(settings))
    return str(folder)


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "remote-code-ran"


@pytest.fixture()
def hostile_sentence(tmp_path, minilm_path, marker) -> str:
    bert_mean(tmp_path / "sentence", minilm_path)
    return make_hostile(tmp_path / "sentence", marker)


def test_the_folder_runs_its_code_when_trusted(hostile_sentence, marker):
    from transformers import AutoConfig

    AutoConfig.from_pretrained(hostile_sentence, trust_remote_code=True)
    assert marker.exists()


def test_sentence_folder_reader_strips_hub_arguments(hostile_sentence, marker):
    from embedder.sentence_encoder import SentenceEncoder, resolve_sentence_settings
    from embedder.sentence_folder import read_sentence_folder

    folder = read_sentence_folder(hostile_sentence)
    assert "trust_remote_code" not in folder.config_kwargs and "trust_remote_code" not in folder.tokenizer_kwargs
    resolve_sentence_settings(hostile_sentence)
    SentenceEncoder(hostile_sentence, dtype="float32", device="cpu")
    assert not marker.exists()


def test_serving_config_resolution_runs_no_folder_code(hostile_sentence, marker):
    from deployments.settings import ModelConfig

    ModelConfig(name="hostile", model_name=hostile_sentence).resolved()
    assert not marker.exists()


def test_operator_config_still_passes_trust_remote_code(hostile_sentence, marker):
    """trust_remote_code comes from the operator's own config, and only from there."""
    from embedder.sentence_encoder import resolve_sentence_settings

    resolve_sentence_settings(hostile_sentence, transformer_kwargs={"trust_remote_code": True})
    from transformers import AutoConfig

    AutoConfig.from_pretrained(hostile_sentence, **resolve_sentence_settings(
        hostile_sentence, transformer_kwargs={"trust_remote_code": True}).transformer_kwargs)
    assert marker.exists()


def test_sparse_folder_runs_no_folder_code(tmp_path, minilm_path, marker):
    from embedder.sparse_encoder import SparseEncoderModel, read_sparse_folder

    bert_splade_max(tmp_path / "sparse", minilm_path)
    folder = make_hostile(tmp_path / "sparse", marker)
    assert "trust_remote_code" not in read_sparse_folder(folder).config_kwargs
    SparseEncoderModel(folder, dtype="float32", device="cpu")
    assert not marker.exists()


def test_cross_encoder_folder_runs_no_folder_code(tmp_path, minilm_path, marker):
    from embedder.cross_encoder import CrossEncoderScorer

    st6_identity(tmp_path / "reranker", minilm_path)
    folder = make_hostile(tmp_path / "reranker", marker)
    assert (Path(folder) / "modules.json").exists()
    CrossEncoderScorer(folder, dtype="float32", device="cpu")
    assert not marker.exists()
