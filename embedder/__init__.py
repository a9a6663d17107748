"""A torch library reproducing AllenNLP's pretrained-transformer embedders.

Never imports ray: use it in a plain torch training loop.
"""

from embedder.bert_embedder import BertEmbedder, PretrainedBertEmbedder, PretrainedBertModel
from embedder.cache import ModelSpec, cache_info, clear_cache, get_model, get_tokenizer
from embedder.folded_batch import FoldedBatch
from embedder.indexer import PretrainedTransformerIndexer
from embedder.inference import EncodeStats, encode_folded
from embedder.mismatched_embedder import PretrainedTransformerMismatchedEmbedder
from embedder.scalar_mix import ScalarMix
from embedder.sentence_pooling import PoolingDefaults, pool_ragged, pool_sentences, read_pooling_defaults
from embedder.transformer_embedder import PretrainedTransformerEmbedder
from embedder.word_pooling import pool_spans

__all__ = [
    "BertEmbedder",
    "EncodeStats",
    "FoldedBatch",
    "ModelSpec",
    "PoolingDefaults",
    "PretrainedBertEmbedder",
    "PretrainedBertModel",
    "PretrainedTransformerEmbedder",
    "PretrainedTransformerIndexer",
    "PretrainedTransformerMismatchedEmbedder",
    "ScalarMix",
    "cache_info",
    "clear_cache",
    "encode_folded",
    "get_model",
    "get_tokenizer",
    "pool_ragged",
    "pool_sentences",
    "pool_spans",
    "read_pooling_defaults",
]
