"""``encode_folded``: the inference path that the serving and bulk code call.

Segments of one or many ``FoldedBatch`` es are sorted by length and run in
sub-batches bounded by a token budget, each padded only to its own longest
segment; the output is unfolded and returned per input, as wordpiece, word or
pooled vectors. It equals ``PretrainedTransformerEmbedder.forward`` on the
same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args, overload

import numpy as np
import torch

from embedder.batching import padded_groups
from embedder.chunking import chunk_vectors
from embedder.devices import host_to_device
from embedder.folded_batch import FoldedBatch
from embedder.folding import unfold_index
from embedder.sentence_head import SentenceHead
from embedder.transformer_embedder import PretrainedTransformerEmbedder, check_type_ids
from embedder.word_pooling import SubTokenMode, pool_spans

Level = Literal["pooled", "wordpiece", "word", "chunk"]
LEVELS: tuple[str, ...] = get_args(Level)

#: pooled: ``[num_inputs, dim]``; wordpiece / word / chunk: one ``[length, dim]`` array per input.
Encoded = np.ndarray | list[np.ndarray]


@dataclass
class EncodeStats:
    """What a call of ``encode_folded`` computed."""

    real_tokens: int = 0
    computed_tokens: int = 0
    sub_batches: int = 0

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / computed tokens (1.0 means no padding at all)."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


def _run_segments(
    embedder: PretrainedTransformerEmbedder,
    batch: FoldedBatch,
    max_batch_tokens: int,
    stats: EncodeStats | None,
) -> torch.Tensor:
    """Every segment's output, laid out like ``batch.token_ids``: ``[num_tokens, dim]``, on the
    embedder's device. Every position is computed on the host, so the device never waits for the
    host to learn a size (no boolean-mask indexing on the device)."""
    device = embedder.device
    lengths = batch.segment_lengths.astype(np.int64)
    starts = batch.segment_starts()
    token_ids = batch.token_ids.astype(np.int64)
    type_ids = None if batch.type_ids is None else batch.type_ids.astype(np.int64)
    output = torch.empty(batch.num_tokens, embedder.get_output_dim(), dtype=torch.float32, device=device)
    groups = computed = 0
    for padded in padded_groups(lengths, starts, token_ids, type_ids, embedder.pad_token_id, max_batch_tokens):
        groups, computed = groups + 1, computed + padded.ids.size
        types = None if padded.types is None else host_to_device(padded.types, device)
        real = np.flatnonzero(padded.mask)  # the real tokens among the padded batch's positions
        hidden = embedder.encode_segments(host_to_device(padded.ids, device), host_to_device(padded.mask, device),
                                          types)
        real_rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, host_to_device(real, device))
        output.index_copy_(0, host_to_device(padded.source.reshape(-1)[real], device), real_rows.float())
    if stats is not None:
        stats.real_tokens += batch.num_tokens
        stats.computed_tokens += computed
        stats.sub_batches += groups
    return output


def _split_rows(rows: torch.Tensor, sizes: np.ndarray) -> list[np.ndarray]:
    """One copy back to the host, then numpy views per input."""
    return np.split(rows.cpu().numpy(), np.cumsum(sizes)[:-1])


@overload
def encode_folded(embedder: PretrainedTransformerEmbedder, batches: FoldedBatch, **kwargs) -> Encoded: ...
@overload
def encode_folded(embedder: PretrainedTransformerEmbedder, batches: Sequence[FoldedBatch], **kwargs) -> list[Encoded]: ...


def encode_folded(
    embedder: PretrainedTransformerEmbedder,
    batches: FoldedBatch | Sequence[FoldedBatch],
    *,
    level: Level = "pooled",
    head: SentenceHead | None = None,
    pooling: str | Sequence[str] | None = None,
    normalize: bool | None = None,
    sub_token_mode: SubTokenMode = "avg",
    max_batch_tokens: int = 16384,
    stats: EncodeStats | None = None,
) -> Encoded | list[Encoded]:
    """Encode one ``FoldedBatch`` (or several, batched together) into float32 arrays.

    ``level="pooled"`` gives ``[num_inputs, dim]`` per batch, pooled by ``head`` (default:
    mean pooling) with the request's own ``pooling`` modes and ``normalize`` switch if given;
    ``"chunk"`` one ``[num_chunks, dim]`` array per input (late chunking: each chunk the mean of
    its wordpieces, then ``head``'s modules; the batch must come from ``fold_chunks``);
    ``"wordpiece"`` one
    ``[num_wordpieces, dim]`` array per input; ``"word"`` one ``[num_words, dim]``
    array per input (the batch must come from words). ``stats`` (optional) is
    filled with the tokens computed and the padding efficiency.
    """
    if level not in LEVELS:
        raise ValueError(f"Unknown level {level!r}; expected one of {LEVELS}")
    single = isinstance(batches, FoldedBatch)
    batch_list = [batches] if single else list(batches)
    if not batch_list:
        return []
    merged = FoldedBatch.concat(batch_list)
    special = embedder.special_tokens
    if (merged.num_start_tokens, merged.num_end_tokens) != (special.num_start, special.num_end):
        raise ValueError("the batch was folded by a tokenizer with other special tokens than the embedder's")
    if level == "word" and not merged.has_words:
        raise ValueError("level='word' needs a batch built from words")
    if level == "chunk" and not merged.has_chunks:
        raise ValueError("level='chunk' needs a batch from fold_chunks")
    if merged.type_ids is not None:
        check_type_ids(torch.from_numpy(merged.type_ids), embedder.type_vocab_size)
    head = head or SentenceHead(embedder.get_output_dim())
    if merged.num_inputs == 0:
        results = [np.zeros((0, head.get_output_dim()), np.float32) if level == "pooled" else []
                   for _ in batch_list]
        return results[0] if single else results
    if embedder.max_length is not None and int(merged.segment_lengths.max()) > embedder.max_length:
        raise ValueError(f"a segment is longer than the embedder's max_length {embedder.max_length}")

    with torch.inference_mode():
        flat = _run_segments(embedder, merged, max_batch_tokens, stats)
        unfolded = flat.index_select(0, host_to_device(unfold_index(merged), flat.device))
        inputs_per_batch = np.array([b.num_inputs for b in batch_list])
        if level == "pooled":
            prompt_lengths = None if merged.prompt_lengths is None else torch.from_numpy(merged.prompt_lengths)
            pooled = head.to(flat.device)(unfolded, torch.from_numpy(merged.num_wordpieces), prompt_lengths,
                                          pooling=pooling, normalize=normalize)
            results = _split_rows(pooled, inputs_per_batch)
        elif level == "chunk":
            input_starts = np.cumsum(merged.num_wordpieces) - merged.num_wordpieces
            spans = merged.chunk_spans + np.repeat(input_starts, merged.chunks_per_input)[:, None]
            vectors = chunk_vectors(unfolded, spans, head.to(flat.device), normalize)
            arrays = _split_rows(vectors, merged.chunks_per_input)
            bounds = np.cumsum(inputs_per_batch)
            results = [arrays[end - n:end] for end, n in zip(bounds, inputs_per_batch)]
        else:
            sizes = merged.num_wordpieces
            if level == "word":
                offsets = host_to_device(merged.word_offsets.astype(np.int64), flat.device)
                word_starts = merged.word_starts()
                sequences = torch.split(unfolded, sizes.tolist())
                unfolded = torch.cat([
                    pool_spans(seq.unsqueeze(0), offsets[start:start + count].unsqueeze(0), sub_token_mode)[0]
                    for seq, start, count in zip(sequences, word_starts, merged.words_per_input)
                ])
                sizes = merged.words_per_input
            arrays = _split_rows(unfolded, sizes)
            bounds = np.cumsum(inputs_per_batch)
            results = [arrays[end - n:end] for end, n in zip(bounds, inputs_per_batch)]
    return results[0] if single else results
