"""Tiny reranker (cross-encoder) folders, laid out as the hub has them.

Each folder holds a 2-layer ``*ForSequenceClassification`` model of hidden size 32 with random
weights (``initializer_range`` 0.2, so that scores differ from pair to pair and from window to
window) and its tokenizer: plain ``transformers`` folders (the activation in ``config.json``, new
key or old, or none), one saved by sentence-transformers 6 itself (``modules.json``,
``config_sentence_transformers.json`` with ``activation_fn``, a default prompt), an XLM-RoBERTa
reranker with a SentencePiece-style Unigram tokenizer, and 3-label classifiers. The tests compare
the project against ``CrossEncoder(folder)`` on these folders.

``LLM_RERANKERS``: a Qwen3-Reranker style LLM reranker (a 2-layer random ``Qwen3ForCausalLM``, a
byte-level BPE tokenizer with "yes" and "no" tokens and Qwen3-Reranker's chat template, an
instruction as the default prompt) saved by sentence-transformers 6 (``Transformer`` plus
``LogitScore``), and the same folder before sentence-transformers saved it (plain ``transformers``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from st_folders import HIDDEN, INIT_RANGE, TRAINING_TEXT, copy_minilm_tokenizer, save_unigram_tokenizer, write_json

IDENTITY = "torch.nn.modules.linear.Identity"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
#: The default prompt of the sentence-transformers-saved folder.
ST6_PROMPTS = {"query": "query: "}


@dataclass(frozen=True)
class RerankerSpec:
    """One reranker setup: its name, what builds it, its labels and its length as CrossEncoder decides it."""

    name: str
    build: Callable[[Path, str], None]
    num_labels: int
    max_length: int


def patch_config(folder: Path, filename: str = "config.json", **changes) -> None:
    """Set keys of a folder's JSON file (a key set to ``None`` is removed)."""
    path = folder / filename
    content = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    write_json(path, content)


def save_bert_classifier(folder: Path, minilm_path: str, *, num_labels: int, seed: int,
                         max_position_embeddings: int = 64) -> None:
    """A 2-layer random ``BertForSequenceClassification`` with MiniLM's tokenizer (``model_max_length``
    512, so the positions decide the length)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_position_embeddings,
                        initializer_range=INIT_RANGE, num_labels=num_labels)
    folder.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    copy_minilm_tokenizer(minilm_path, folder)


def bert_plain(folder: Path, minilm_path: str) -> None:
    """ms-marco-MiniLM style, saved by ``transformers`` alone, one label, no activation: sigmoid."""
    save_bert_classifier(folder, minilm_path, num_labels=1, seed=21)


def st6_identity(folder: Path, minilm_path: str) -> None:
    """Saved by sentence-transformers 6 (``CrossEncoder.save``): ``activation_fn`` Identity, a default
    ``query`` prompt, ``max_length`` 48 written into the tokenizer's config."""
    from sentence_transformers import CrossEncoder

    source = folder.parent / (folder.name + "-source")
    save_bert_classifier(source, minilm_path, num_labels=1, seed=22, max_position_embeddings=96)
    model = CrossEncoder(str(source), activation_fn=torch.nn.Identity(), max_length=48, prompts=ST6_PROMPTS,
                         default_prompt_name="query", device="cpu")
    model.save(str(folder))


def xlmr_reranker(folder: Path, minilm_path: str) -> None:
    """bge-reranker style: XLM-RoBERTa, a SentencePiece-style Unigram tokenizer (``model_max_length``
    64), one label, the old ``sbert_ce_default_activation_function`` Identity in ``config.json``."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_unigram_tokenizer(folder)
    patch_config(folder, "tokenizer_config.json", model_max_length=64)
    torch.manual_seed(23)
    config = XLMRobertaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, initializer_range=INIT_RANGE,
                              num_labels=1)
    XLMRobertaForSequenceClassification(config).eval().save_pretrained(folder)
    patch_config(folder, sbert_ce_default_activation_function=IDENTITY)


def bert_three_labels(folder: Path, minilm_path: str) -> None:
    """An NLI-style classifier: 3 labels, no activation in the folder, so identity (the raw logits)."""
    save_bert_classifier(folder, minilm_path, num_labels=3, seed=24)


def bert_three_labels_sigmoid(folder: Path, minilm_path: str) -> None:
    """3 labels with ``config.json``'s ``sentence_transformers.activation_fn`` Sigmoid (sentence-transformers
    4 and 5 saved it there)."""
    save_bert_classifier(folder, minilm_path, num_labels=3, seed=25)
    patch_config(folder, sentence_transformers={"activation_fn": SIGMOID, "version": "4.1.0"})


RERANKERS: tuple[RerankerSpec, ...] = (
    RerankerSpec("bert-plain", bert_plain, num_labels=1, max_length=64),
    RerankerSpec("st6-identity", st6_identity, num_labels=1, max_length=48),
    RerankerSpec("xlmr-reranker", xlmr_reranker, num_labels=1, max_length=64),
    RerankerSpec("bert-3-labels", bert_three_labels, num_labels=3, max_length=64),
    RerankerSpec("bert-3-labels-sigmoid", bert_three_labels_sigmoid, num_labels=3, max_length=64),
)


#: Qwen3-Reranker's chat template, as sentence-transformers 6 takes it: the pair's ``query`` and
#: ``document`` messages, the prompt (the instruction) as the ``system`` message, else a default one.
QWEN3_RERANKER_TEMPLATE = (
    "{%- set instruction = messages | selectattr('role', 'eq', 'system') | map(attribute='content') | first -%}\n"
    "{%- set query = messages | selectattr('role', 'eq', 'query') | map(attribute='content') | first -%}\n"
    "{%- set document = messages | selectattr('role', 'eq', 'document') | map(attribute='content') | first -%}\n"
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {{ instruction or 'Given a web search query, retrieve relevant passages that answer the query' }}\n"
    "<Query>: {{ query }}\n<Document>: {{ document }}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
#: The LLM reranker's prompts: an instruction, the default one.
LLM_PROMPTS = {"web": "Given a web search query, retrieve relevant passages that answer the query",
               "short": "Find the answer"}


def save_chatml_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer in Qwen's manner (no special tokens added, ChatML control tokens)
    trained so that Qwen3-Reranker's template takes few tokens and "yes" and "no" are tokens; its
    chat template is ``QWEN3_RERANKER_TEMPLATE``. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    template_text = (QWEN3_RERANKER_TEMPLATE.split("-%}\n")[-1] + " ".join(LLM_PROMPTS.values())
                     + ' "yes" "no" yes no\n')
    backend.train_from_iterator([TRAINING_TEXT, template_text * 40], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=131072)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.chat_template = QWEN3_RERANKER_TEMPLATE
    tokenizer.save_pretrained(folder)
    return backend.get_vocab_size()


def qwen3_llm_plain(folder: Path, minilm_path: str) -> None:
    """Qwen3-Reranker as the hub has it without sentence-transformers' files: a ``Qwen3ForCausalLM``
    (positions 256) and its tokenizer with the chat template; sentence-transformers scores it with
    "yes" minus "no" and no prompt."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_chatml_tokenizer(folder)
    torch.manual_seed(26)
    config = Qwen3Config(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=256,
                         initializer_range=INIT_RANGE, tie_word_embeddings=False)
    Qwen3ForCausalLM(config).eval().save_pretrained(folder)


def qwen3_llm_reranker(folder: Path, minilm_path: str) -> None:
    """The Qwen3-Reranker folder saved by sentence-transformers 6 (``CrossEncoder.save``): Transformer
    (``text-generation``, the ``message`` modality) and LogitScore ("yes" minus "no"), the instruction
    as the default prompt, ``max_length`` 192."""
    from sentence_transformers import CrossEncoder

    source = folder.parent / (folder.name + "-source")
    qwen3_llm_plain(source, minilm_path)
    model = CrossEncoder(str(source), max_length=192, prompts=LLM_PROMPTS, default_prompt_name="web", device="cpu")
    model.save(str(folder))


LLM_RERANKERS: tuple[RerankerSpec, ...] = (
    RerankerSpec("qwen3-llm-reranker", qwen3_llm_reranker, num_labels=1, max_length=192),
    RerankerSpec("qwen3-llm-plain", qwen3_llm_plain, num_labels=1, max_length=256),
)


def build_rerankers(root: Path, minilm_path: str, specs: tuple[RerankerSpec, ...] = RERANKERS) -> dict[str, str]:
    """Every reranker setup's folder under ``root``, by setup name."""
    paths = {}
    for spec in specs:
        spec.build(root / spec.name, minilm_path)
        paths[spec.name] = str(root / spec.name)
    return paths


def copy_with_changes(source: str, folder: Path, filename: str = "config.json", **changes) -> str:
    """A copy of a reranker folder with keys of one of its JSON files changed (for the refusals)."""
    shutil.copytree(source, folder)
    patch_config(folder, filename, **changes)
    return str(folder)
