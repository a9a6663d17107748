"""A torch library reproducing AllenNLP's pretrained-transformer embedders.

Never imports ray: use it in a plain torch training loop.
"""

from embedder.bert_embedder import BertEmbedder, PretrainedBertEmbedder, PretrainedBertModel
from embedder.cache import ModelSpec, cache_info, clear_cache, get_model, get_tokenizer
from embedder.cross_encoder import CrossEncoderFolder, CrossEncoderScorer, PairScore, read_cross_encoder_folder
from embedder.folded_batch import FoldedBatch
from embedder.indexer import PretrainedTransformerIndexer
from embedder.inference import EncodeStats, encode_folded
from embedder.mismatched_embedder import PretrainedTransformerMismatchedEmbedder
from embedder.scalar_mix import ScalarMix
from embedder.sentence_encoder import SentenceEncoder, SentenceSettings, resolve_sentence_settings
from embedder.sentence_folder import SentenceFolder, UnsupportedModelError, read_sentence_folder
from embedder.sentence_head import SentenceHead
from embedder.sentence_pooling import POOLING_MODES, pool_ragged, pool_sentences
from embedder.sparse_encoder import SparseEncoderModel, SparseFolder, read_sparse_folder
from embedder.transformer_embedder import PretrainedTransformerEmbedder
from embedder.word_pooling import pool_spans

__all__ = [
    "BertEmbedder",
    "CrossEncoderFolder",
    "CrossEncoderScorer",
    "EncodeStats",
    "FoldedBatch",
    "ModelSpec",
    "PairScore",
    "POOLING_MODES",
    "PretrainedBertEmbedder",
    "PretrainedBertModel",
    "PretrainedTransformerEmbedder",
    "PretrainedTransformerIndexer",
    "PretrainedTransformerMismatchedEmbedder",
    "ScalarMix",
    "SentenceEncoder",
    "SentenceFolder",
    "SentenceHead",
    "SentenceSettings",
    "SparseEncoderModel",
    "SparseFolder",
    "UnsupportedModelError",
    "cache_info",
    "clear_cache",
    "encode_folded",
    "get_model",
    "get_tokenizer",
    "pool_ragged",
    "pool_sentences",
    "pool_spans",
    "read_cross_encoder_folder",
    "read_sentence_folder",
    "read_sparse_folder",
    "resolve_sentence_settings",
]
