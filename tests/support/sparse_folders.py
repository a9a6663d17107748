"""Tiny SPLADE (sparse encoder) folders, laid out as the hub has them.

Each folder holds a 2-layer ``*ForMaskedLM`` model of hidden size 32 with random weights
(``initializer_range`` 0.2, so that the masked-LM logits differ from token to token and a few
hundred vocabulary entries come out positive), MiniLM's tokenizer, and the sentence-transformers
files of a ``SparseEncoder``: ``modules.json`` (the masked-LM ``MLMTransformer``, or the new
``Transformer`` with ``transformer_task: fill-mask``, then ``SpladePooling``),
``sentence_bert_config.json``, ``1_SpladePooling/config.json`` (``pooling_strategy`` max or sum,
``activation_function`` relu or log1p_relu) and ``config_sentence_transformers.json`` with
``model_type: SparseEncoder`` and prompts (one folder is a plain masked-LM without them, which
sentence-transformers reads as SPLADE max over relu). Two folders are written by sentence-transformers' own
``SparseEncoder.save`` (one of them inference-free SPLADE: a ``Router`` with a ``SparseStaticEmbedding``
query route), one names sentence-transformers 5's module paths
(``sentence_transformers.sparse_encoder.models.*``). The tests compare the project against
``SparseEncoder(folder).encode`` on these folders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from st_folders import HIDDEN, INIT_RANGE, copy_minilm_tokenizer, write_json

ST6_MLM = "sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer"
ST6_SPLADE = "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"
ST5_MLM = "sentence_transformers.sparse_encoder.models.MLMTransformer"
ST5_SPLADE = "sentence_transformers.sparse_encoder.models.SpladePooling"
#: Subtracted from the masked-LM output bias (the random logits have a standard deviation near 1.1).
LOGIT_SHIFT = 2.8
SPARSE_PROMPTS = {"query": "query: ", "document": "passage: "}


@dataclass(frozen=True)
class SparseSpec:
    """One SPLADE setup: its name, what builds it, and its prompts."""

    name: str
    build: Callable[[Path, str], None]
    prompts: dict[str, str] = field(default_factory=dict)


def save_sparse_mlm(model: torch.nn.Module, folder: Path) -> None:
    """Save a random masked-LM with its output bias lowered by ``LOGIT_SHIFT``, so that about 1% of a
    token's logits are positive (a vector has hundreds to a few thousand non-zeros, as trained SPLADE
    models have, rather than most of the vocabulary)."""
    with torch.no_grad():
        model.get_output_embeddings().bias -= LOGIT_SHIFT
    model.eval().save_pretrained(folder)


def save_bert_mlm(folder: Path, minilm_path: str, *, seed: int, max_position_embeddings: int = 64) -> None:
    """A 2-layer random ``BertForMaskedLM`` with MiniLM's tokenizer (512 in its config, so the positions
    or the folder's ``max_seq_length`` decide the length)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_position_embeddings,
                        initializer_range=INIT_RANGE)
    folder.mkdir(parents=True, exist_ok=True)
    save_sparse_mlm(BertForMaskedLM(config), folder)
    copy_minilm_tokenizer(minilm_path, folder)


def save_distilbert_mlm(folder: Path, minilm_path: str, *, seed: int) -> None:
    """A 2-layer random ``DistilBertForMaskedLM`` with MiniLM's (BERT WordPiece) tokenizer."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=30522, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, initializer_range=INIT_RANGE)
    folder.mkdir(parents=True, exist_ok=True)
    save_sparse_mlm(DistilBertForMaskedLM(config), folder)
    copy_minilm_tokenizer(minilm_path, folder)


def write_sparse_files(folder: Path, *, pooling_strategy: str = "max", activation_function: str = "relu",
                       mlm_type: str = ST6_MLM, splade_type: str = ST6_SPLADE, max_seq_length: int | None = 48,
                       prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                       transformer_task: str | None = None, max_active_dims: int | None = None) -> None:
    """The sentence-transformers files of a SparseEncoder around a masked-LM folder."""
    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": mlm_type},
        {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": splade_type}])
    sentence_bert = {"do_lower_case": False}
    if max_seq_length is not None:
        sentence_bert["max_seq_length"] = max_seq_length
    if transformer_task is not None:
        sentence_bert["transformer_task"] = transformer_task
    write_json(folder / "sentence_bert_config.json", sentence_bert)
    write_json(folder / "1_SpladePooling" / "config.json",
               {"pooling_strategy": pooling_strategy, "activation_function": activation_function,
                "word_embedding_dimension": 30522})
    settings = {"model_type": "SparseEncoder", "__version__": {"sentence_transformers": "5.0.0"},
                "prompts": prompts or {}, "default_prompt_name": default_prompt_name, "similarity_fn_name": "dot"}
    if max_active_dims is not None:
        settings["max_active_dims"] = max_active_dims
    write_json(folder / "config_sentence_transformers.json", settings)


def bert_splade_max(folder: Path, minilm_path: str) -> None:
    """naver/splade style: BERT, max pooling, relu, query/passage prompts (no default)."""
    save_bert_mlm(folder, minilm_path, seed=31)
    write_sparse_files(folder, prompts=SPARSE_PROMPTS)


def bert_splade_sum(folder: Path, minilm_path: str) -> None:
    """The original SPLADE: sum pooling."""
    save_bert_mlm(folder, minilm_path, seed=32)
    write_sparse_files(folder, pooling_strategy="sum", max_seq_length=40)


def bert_log1p_relu(folder: Path, minilm_path: str) -> None:
    """opensearch style: max pooling, ``log1p_relu``; the new ``Transformer`` module with
    ``transformer_task: fill-mask``; no ``max_seq_length`` (the 64 positions decide)."""
    save_bert_mlm(folder, minilm_path, seed=33)
    write_sparse_files(folder, activation_function="log1p_relu", max_seq_length=None,
                       mlm_type="sentence_transformers.base.modules.transformer.Transformer",
                       transformer_task="fill-mask")


def distilbert_splade(folder: Path, minilm_path: str) -> None:
    """splade-cocondenser style on DistilBERT, with a default ``document`` prompt."""
    save_distilbert_mlm(folder, minilm_path, seed=34)
    write_sparse_files(folder, prompts=SPARSE_PROMPTS, default_prompt_name="document")


def st5_paths(folder: Path, minilm_path: str) -> None:
    """Written with sentence-transformers 5's module paths (``sparse_encoder.models.*``) and a
    model-wide ``max_active_dims``."""
    save_bert_mlm(folder, minilm_path, seed=35)
    write_sparse_files(folder, mlm_type=ST5_MLM, splade_type=ST5_SPLADE, max_active_dims=24)


def plain_masked_lm(folder: Path, minilm_path: str) -> None:
    """A plain ``BertForMaskedLM`` folder, no sentence-transformers files: ``SparseEncoder(folder)`` reads it
    as SPLADE (max, relu); the cluster serves it so with ``pooling: splade`` (TEI's ``--pooling splade``)."""
    save_bert_mlm(folder, minilm_path, seed=39)


def st6_saved(folder: Path, minilm_path: str) -> None:
    """Written by sentence-transformers 6's own ``SparseEncoder.save``: ``Transformer`` (fill-mask) +
    ``SpladePooling`` (sum), a default ``query`` prompt, ``max_seq_length`` 32."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    source = folder.parent / (folder.name + "-source")
    save_bert_mlm(source, minilm_path, seed=36)
    transformer = Transformer(str(source), transformer_task="fill-mask", max_seq_length=32)
    model = SparseEncoder(modules=[transformer, SpladePooling(pooling_strategy="sum")],
                          prompts=SPARSE_PROMPTS, default_prompt_name="query", device="cpu")
    model.save(str(folder))


def inference_free(folder: Path, minilm_path: str) -> None:
    """Inference-free SPLADE (opensearch doc-v3 style), written by sentence-transformers' own ``save``: a
    ``Router`` whose ``query`` route is a ``SparseStaticEmbedding`` (random static weights, a quarter of
    them zero) and whose ``document`` route (the default) is ``Transformer`` (fill-mask, ``max_seq_length``
    40) + ``SpladePooling`` (max); a ``query`` prompt."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import Router, SparseStaticEmbedding, SpladePooling, Transformer
    from transformers import AutoTokenizer

    source = folder.parent / (folder.name + "-source")
    save_bert_mlm(source, minilm_path, seed=37)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    generator = torch.Generator().manual_seed(38)
    weight = torch.rand(tokenizer.vocab_size, generator=generator) * 3
    weight[torch.rand(tokenizer.vocab_size, generator=generator) < 0.25] = 0
    router = Router.for_query_document(
        query_modules=[SparseStaticEmbedding(tokenizer, weight=weight, frozen=True)],
        document_modules=[Transformer(str(source), transformer_task="fill-mask", max_seq_length=40),
                          SpladePooling(pooling_strategy="max")])
    SparseEncoder(modules=[router], prompts={"query": "q: "}, device="cpu").save(str(folder))


SPARSE_SETUPS: tuple[SparseSpec, ...] = (
    SparseSpec("bert-splade-max", bert_splade_max, SPARSE_PROMPTS),
    SparseSpec("bert-splade-sum", bert_splade_sum),
    SparseSpec("bert-log1p-relu", bert_log1p_relu),
    SparseSpec("distilbert-splade", distilbert_splade, SPARSE_PROMPTS),
    SparseSpec("st5-paths", st5_paths),
    SparseSpec("st6-saved", st6_saved, SPARSE_PROMPTS),
    SparseSpec("plain-masked-lm", plain_masked_lm),
)


#: Built by ``build_sparse`` beside the setups above (its routes are tested on their own).
INFERENCE_FREE = SparseSpec("inference-free", inference_free, {"query": "q: "})


def build_sparse(root: Path, minilm_path: str) -> dict[str, str]:
    """Every SPLADE setup's folder under ``root``, by setup name."""
    paths = {}
    for spec in (*SPARSE_SETUPS, INFERENCE_FREE):
        spec.build(root / spec.name, minilm_path)
        paths[spec.name] = str(root / spec.name)
    return paths


def set_module_type(folder: Path, index: int, module_type: str) -> None:
    """Change the type of one ``modules.json`` entry (for the refusals)."""
    modules = json.loads((folder / "modules.json").read_text())
    modules[index]["type"] = module_type
    write_json(folder / "modules.json", modules)


def masked_lm_reference(folder: str, text: str, max_length: int, prompt: str | None = None) -> np.ndarray:
    """SpladePooling over the unfolded sequence, from the plain masked-LM run on each segment alone:
    the text's wordpieces (from the tokenizer, no specials) cut into ``max_length - 2`` pieces, each
    wrapped in [CLS] ... [SEP]; the first segment's [CLS], every segment's text wordpieces and the
    last segment's [SEP] are pooled (the inner specials are not wordpieces of the text)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from embedder.sparse_encoder import read_sparse_folder

    settings = read_sparse_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(settings.transformer_path)
    model = AutoModelForMaskedLM.from_pretrained(settings.transformer_path, dtype=torch.float32).eval()
    pieces = tokenizer((prompt or "") + text, add_special_tokens=False)["input_ids"]
    chunk = max_length - 2
    cut = [pieces[i:i + chunk] for i in range(0, len(pieces), chunk)]
    per_position = []
    with torch.no_grad():
        for index, part in enumerate(cut):
            ids = torch.tensor([[tokenizer.cls_token_id, *part, tokenizer.sep_token_id]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            values = torch.log1p(torch.relu(logits))
            if settings.activation_function == "log1p_relu":
                values = torch.log1p(values)
            lo = 0 if index == 0 else 1
            hi = len(part) + 2 if index == len(cut) - 1 else len(part) + 1
            per_position.append(values[lo:hi])
    values = torch.cat(per_position)
    pooled = values.amax(0) if settings.pooling_strategy == "max" else values.sum(0)
    return pooled.numpy()
