"""Independent references built from the plain ``transformers`` model, shared by the suites."""

from __future__ import annotations

import torch


def reference_folded_output(model, pieces, start, end, max_length, **model_kwargs) -> torch.Tensor:
    """Run the plain transformers model on each segment and drop the inner special tokens
    (AllenNLP's folding, done by hand): one vector per wordpiece of the unfolded sequence."""
    chunk = max_length - len(start) - len(end)
    segments = [start + pieces[i:i + chunk] + end for i in range(0, len(pieces), chunk)]
    parts = []
    with torch.no_grad():
        for number, ids in enumerate(segments):
            hidden = model(input_ids=torch.tensor([ids]), **model_kwargs)[0][0]
            lo = 0 if number == 0 else len(start)
            hi = len(ids) if number == len(segments) - 1 else len(ids) - len(end)
            parts.append(hidden[lo:hi])
    return torch.cat(parts)


def plain_sentence_vectors(model, tokenizer, texts, max_length: int, normalize: bool = False):
    """Mean-pooled vectors of the plain model, folding texts longer than ``max_length`` by hand
    (``reference_folded_output``) with the tokenizer's [CLS]/[SEP]-style start and end token."""
    vectors = []
    for text in texts:
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        unfolded = reference_folded_output(model, pieces, [tokenizer.cls_token_id], [tokenizer.sep_token_id],
                                           max_length)
        vectors.append(unfolded.mean(0))
    stacked = torch.stack(vectors)
    return (torch.nn.functional.normalize(stacked, dim=-1) if normalize else stacked).numpy()
