"""Tiny sentence-transformers folders, laid out as the hub has them, for every setup users bring.

Each folder holds a 2-layer transformer of hidden size 32 with random weights
(``initializer_range`` 0.2, so that attention is far from uniform and a wrong
pooling or a lost prompt shows in the cosine), its tokenizer, and the
sentence-transformers files: ``modules.json``, ``sentence_bert_config.json``,
``1_Pooling/config.json`` (old flags or the new ``pooling_mode`` key),
``config_sentence_transformers.json`` (prompts), and Dense / LayerNorm /
Normalize modules. One folder is written by sentence-transformers' own
``save()``. The tests compare the project against
``SentenceTransformer(folder).encode`` on these folders.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 32
INIT_RANGE = 0.2
MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
OLD_POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                     "mean": "pooling_mode_mean_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                     "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}

E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
BGE_PROMPTS = {"query": "Represent this sentence for searching relevant passages: "}
NOMIC_PROMPTS = {"query": "search_query: ", "document": "search_document: "}
QWEN3_PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\n"
                          "Query:", "document": ""}
INSTRUCTOR_PROMPTS = {"query": "Represent the question for retrieving supporting documents: ",
                      "document": "Represent the document for retrieval: "}

#: Text a tokenizer is trained on (the Qwen3 and XLM-R folders train their own, deterministically).
TRAINING_TEXT = """
Embeddings turn text into vectors that search engines compare. A man is eating food. Ray Serve scales
Python services across a cluster of machines. Query: what is the capital of France? Paris is the capital
and most populous city of France. Instruct: Given a web search query, retrieve relevant passages that
answer the query. Represent this sentence for searching relevant passages. The quick brown fox jumps over
the lazy dog. passage: query: search_query: search_document: Represent the question for retrieving
supporting documents. Represent the document for retrieval. Café, naïve, façade, déjà vu. 東京 は 日本 の 首都 です.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation (,.;:!?) and "quotes" - dashes.
""" * 3

#: Texts that fit every setup's length, prompt included.
TEXTS = ["A man is eating food.", "what is the capital of France?", "x",
         "Café, naïve, façade, déjà vu. 東京 は 日本 の 首都 です.",
         "Ray Serve scales Python services across a cluster of machines."]
#: Texts longer than every setup's length, with different beginnings and ends.
LONG_TEXTS = ["The quick brown fox jumps over the lazy dog, again and again. " * 12
              + "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation and quotes. " * 12,
              "Paris is the capital and most populous city of France. " * 10
              + "東京 は 日本 の 首都 です. Café, naïve, façade, déjà vu. " * 12 + "The end."]


@dataclass(frozen=True)
class FolderSpec:
    """One setup: its name, what builds it, and what the tests should ask of it."""

    name: str
    build: Callable[[Path, str], None]
    prompts: dict[str, str] = field(default_factory=dict)
    truncation_sides: tuple[str, ...] = ("right", "left")


# --- tokenizers -------------------------------------------------------------

def copy_minilm_tokenizer(minilm_path: str, folder: Path, model_max_length: int | None = None) -> None:
    """MiniLM's WordPiece tokenizer files, optionally with another ``model_max_length``."""
    for name in MINILM_TOKENIZER_FILES:
        if (Path(minilm_path) / name).exists():
            shutil.copy(Path(minilm_path) / name, folder / name)
    if model_max_length is not None:
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "model_max_length": model_max_length}))


def save_bpe_eos_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer that appends only an EOS (Qwen3-Embedding's template), left padding.
    Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([TRAINING_TEXT], trainer)
    eos = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", padding_side="left", model_max_length=32768)
    tokenizer.save_pretrained(folder)
    return backend.get_vocab_size()


def save_unigram_tokenizer(folder: Path, *, t5_template: bool = False) -> int:
    """A SentencePiece-style Unigram tokenizer with XLM-R's ``<s> $A </s>`` template, or T5's
    ``$A </s>`` (no start token). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if t5_template else ["<s>", "<pad>", "</s>", "<unk>"]
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator([TRAINING_TEXT], trainer)
    eos = ("</s>", backend.token_to_id("</s>"))
    if t5_template:
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[eos])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                            unk_token="<unk>", model_max_length=512)
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", backend.token_to_id("<s>")), eos])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                            pad_token="<pad>", unk_token="<unk>", model_max_length=512)
    tokenizer.save_pretrained(folder)
    return backend.get_vocab_size()


# --- sentence-transformers files -------------------------------------------

def write_json(path: Path, content: dict | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))


def write_modules(folder: Path, modules: list[tuple[str, str]]) -> None:
    """``modules.json`` from (path, class name) pairs, with the classic ``sentence_transformers.models`` types."""
    write_json(folder / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(modules)])


def write_pooling(folder: Path, mode: str | tuple[str, ...], *, new_format: bool = False,
                  include_prompt: bool = True, dimension: int = HIDDEN) -> None:
    modes = (mode,) if isinstance(mode, str) else mode
    if new_format:
        config = {"embedding_dimension": dimension, "pooling_mode": mode if isinstance(mode, str) else list(mode)}
    else:
        config = {"word_embedding_dimension": dimension,
                  **{flag: name in modes for name, flag in OLD_POOLING_FLAGS.items()}}
    if not include_prompt:
        config["include_prompt"] = False
    write_json(folder / "1_Pooling" / "config.json", config)


def write_dense(folder: Path, path: str, in_features: int, out_features: int, *, bias: bool = True,
                activation: str = "torch.nn.modules.activation.Tanh", torch_file: bool = False, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    weights = {"linear.weight": torch.randn(out_features, in_features, generator=generator) * 0.3}
    if bias:
        weights["linear.bias"] = torch.randn(out_features, generator=generator) * 0.3
    write_json(folder / path / "config.json", {"in_features": in_features, "out_features": out_features,
                                               "bias": bias, "activation_function": activation})
    if torch_file:
        torch.save(weights, folder / path / "pytorch_model.bin")
    else:
        save_file(weights, str(folder / path / "model.safetensors"))


def write_layer_norm(folder: Path, path: str, dimension: int, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    write_json(folder / path / "config.json", {"dimension": dimension})
    save_file({"norm.weight": 1 + 0.5 * torch.randn(dimension, generator=generator),
               "norm.bias": 0.5 * torch.randn(dimension, generator=generator)},
              str(folder / path / "model.safetensors"))


def write_st_config(folder: Path, prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                    max_seq_length: int | None = None, **sentence_bert) -> None:
    write_json(folder / "config_sentence_transformers.json",
               {"__version__": {"sentence_transformers": "3.0.1"}, "prompts": prompts or {},
                "default_prompt_name": default_prompt_name, "similarity_fn_name": "cosine"})
    config = {"do_lower_case": False, **sentence_bert}
    if max_seq_length is not None:
        config["max_seq_length"] = max_seq_length
    write_json(folder / "sentence_bert_config.json", config)


# --- transformers ------------------------------------------------------------

def save_bert(folder: Path, minilm_path: str, seed: int = 0, max_position_embeddings: int = 128) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_position_embeddings,
                        initializer_range=INIT_RANGE)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).eval().save_pretrained(folder)
    copy_minilm_tokenizer(minilm_path, folder)


def bert_mean(folder: Path, minilm_path: str) -> None:
    """all-MiniLM style: mean pooling (old flags), Normalize."""
    save_bert(folder, minilm_path, seed=1)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    write_pooling(folder, "mean")
    write_st_config(folder, max_seq_length=64)


def bert_cls_prompt(folder: Path, minilm_path: str) -> None:
    """bge style: CLS pooling, a query prompt, Normalize."""
    save_bert(folder, minilm_path, seed=2)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    write_pooling(folder, "cls")
    write_st_config(folder, prompts=BGE_PROMPTS, max_seq_length=48)


def st6_saved(folder: Path, minilm_path: str) -> None:
    """Written by sentence-transformers' own ``save()``: the new ``pooling_mode`` key, a default prompt."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    source = folder.parent / (folder.name + "-source")
    save_bert(source, minilm_path, seed=3)
    transformer = Transformer(str(source), max_seq_length=40)
    model = SentenceTransformer(modules=[transformer, Pooling(HIDDEN, pooling_mode="cls"), Normalize()],
                                prompts={"query": "query: ", "document": "doc: "}, default_prompt_name="document",
                                device="cpu")
    model.save(str(folder))


def xlmr_e5(folder: Path, minilm_path: str) -> None:
    """multilingual-e5 style: XLM-RoBERTa, SentencePiece tokenizer, query/passage prompts, mean, Normalize."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_unigram_tokenizer(folder)
    torch.manual_seed(4)
    config = XLMRobertaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, initializer_range=INIT_RANGE)
    XLMRobertaModel(config).eval().save_pretrained(folder)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    write_pooling(folder, "mean")
    write_st_config(folder, prompts=E5_PROMPTS, max_seq_length=64)


def mpnet(folder: Path, minilm_path: str) -> None:
    """all-mpnet-base style: MPNet, mean pooling, Normalize; no max_seq_length, so the tokenizer's
    ``model_max_length`` (64) is the length."""
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(5)
    folder.mkdir(parents=True, exist_ok=True)
    config = MPNetConfig(vocab_size=30527, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=66, pad_token_id=0,
                         initializer_range=INIT_RANGE)
    MPNetModel(config).eval().save_pretrained(folder)
    copy_minilm_tokenizer(minilm_path, folder, model_max_length=64)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    write_pooling(folder, "mean")
    write_st_config(folder)


def modernbert(folder: Path, minilm_path: str) -> None:
    """nomic / gte-modernbert style: ModernBERT, search_query/search_document prompts, mean (new key)."""
    from transformers import ModernBertConfig, ModernBertModel

    torch.manual_seed(6)
    folder.mkdir(parents=True, exist_ok=True)
    config = ModernBertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                              cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102,
                              global_attn_every_n_layers=2, local_attention=16, initializer_range=INIT_RANGE)
    ModernBertModel(config).eval().save_pretrained(folder)
    copy_minilm_tokenizer(minilm_path, folder)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling")])
    write_pooling(folder, "mean", new_format=True)
    write_st_config(folder, prompts=NOMIC_PROMPTS, max_seq_length=96)


def qwen3_lasttoken(folder: Path, minilm_path: str) -> None:
    """Qwen3-Embedding style: a decoder, a tokenizer that appends only an EOS, left padding,
    last-token pooling, an instruction prompt for queries, Normalize."""
    from transformers import Qwen3Config, Qwen3Model

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_bpe_eos_tokenizer(folder)
    torch.manual_seed(7)
    config = Qwen3Config(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=256,
                         initializer_range=INIT_RANGE, tie_word_embeddings=False)
    Qwen3Model(config).eval().save_pretrained(folder)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    write_pooling(folder, "lasttoken")
    write_st_config(folder, prompts=QWEN3_PROMPTS, max_seq_length=64)


def t5_encoder(folder: Path, minilm_path: str) -> None:
    """sentence-t5 style: the T5 encoder, mean pooling, a bias-free identity Dense, Normalize."""
    from transformers import T5Config, T5Model

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_unigram_tokenizer(folder, t5_template=True)
    torch.manual_seed(8)
    config = T5Config(vocab_size=vocab, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, initializer_factor=4.0)
    T5Model(config).eval().save_pretrained(folder)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"),
                           ("3_Normalize", "Normalize")])
    write_pooling(folder, "mean")
    write_dense(folder, "2_Dense", HIDDEN, HIDDEN, bias=False, activation="torch.nn.modules.linear.Identity",
                torch_file=True)
    write_st_config(folder, max_seq_length=48)


def bert_dense_normalize(folder: Path, minilm_path: str) -> None:
    """LaBSE style: CLS pooling, a tanh Dense to a smaller dimension, Normalize."""
    save_bert(folder, minilm_path, seed=9)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"),
                           ("3_Normalize", "Normalize")])
    write_pooling(folder, "cls")
    write_dense(folder, "2_Dense", HIDDEN, 16)
    write_st_config(folder, max_seq_length=64)


def bert_weightedmean(folder: Path, minilm_path: str) -> None:
    """SGPT style: position-weighted mean pooling, then a LayerNorm module."""
    save_bert(folder, minilm_path, seed=10)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_LayerNorm", "LayerNorm")])
    write_pooling(folder, "weightedmean")
    write_layer_norm(folder, "2_LayerNorm", HIDDEN)
    write_st_config(folder, max_seq_length=64)


def bert_exclude_prompt(folder: Path, minilm_path: str) -> None:
    """INSTRUCTOR style: ``include_prompt: false`` (prompt tokens left out of the mean), a default prompt."""
    save_bert(folder, minilm_path, seed=11)
    write_modules(folder, [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    write_pooling(folder, "mean", include_prompt=False)
    write_st_config(folder, prompts=INSTRUCTOR_PROMPTS, default_prompt_name="document", max_seq_length=64)


def unknown_module(folder: Path, minilm_path: str) -> None:
    """A module type the project cannot honour (a custom class): must refuse to start."""
    save_bert(folder, minilm_path, seed=12)
    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Rerank", "type": "my_package.modules.CustomRerank"}])
    write_pooling(folder, "mean")
    write_st_config(folder, max_seq_length=64)


SETUPS: tuple[FolderSpec, ...] = (
    FolderSpec("bert-mean", bert_mean),
    FolderSpec("bert-cls-prompt", bert_cls_prompt, BGE_PROMPTS),
    FolderSpec("st6-saved", st6_saved, {"query": "query: ", "document": "doc: "}),
    FolderSpec("xlmr-e5", xlmr_e5, E5_PROMPTS),
    FolderSpec("mpnet", mpnet),
    FolderSpec("modernbert", modernbert, NOMIC_PROMPTS),
    FolderSpec("qwen3-lasttoken", qwen3_lasttoken, QWEN3_PROMPTS),
    FolderSpec("t5-encoder", t5_encoder),
    FolderSpec("bert-dense-normalize", bert_dense_normalize),
    FolderSpec("bert-weightedmean", bert_weightedmean),
    FolderSpec("bert-exclude-prompt", bert_exclude_prompt, INSTRUCTOR_PROMPTS),
)


def build_all(root: Path, minilm_path: str) -> dict[str, str]:
    """Every setup's folder under ``root``, by setup name."""
    paths = {}
    for spec in SETUPS:
        folder = root / spec.name
        spec.build(folder, minilm_path)
        paths[spec.name] = str(folder)
    return paths
