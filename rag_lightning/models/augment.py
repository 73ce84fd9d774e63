"""Training-time augmentations of the generator's inputs, done on token ids (nothing is decoded or re-tokenised).

Answer swapping makes memorising answers useless: for an example whose answer occurs in its retrieved
contexts, the answer tokens are replaced, in every context and in the target, by another example's answer (of
the batch, or, where the data module hands each example a donor, another answer of its relation).
The generator can then only be right by reading (copying) the passage, never by recalling what it saw for
the same question before.

Question-word dropout makes the reader lean on the passage and on what is left of the question rather than
on the exact template words it was trained on: each question token is masked at random before the contexts
are built, so a question that names its relation in other words (a synonym, a description) looks less
foreign at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rag_lightning.padding import pad_right


def _find(haystack: list[int], needle: list[int]) -> list[int]:
    """Start positions of non-overlapping occurrences of `needle` in `haystack`."""
    starts, i, n = [], 0, len(needle)
    while n and i + n <= len(haystack):
        if haystack[i : i + n] == needle:
            starts.append(i)
            i += n
        else:
            i += 1
    return starts


def _replace(seq: list[int], old: list[int], new: list[int]) -> list[int]:
    out, last = [], 0
    for start in _find(seq, old):
        out += seq[last:start] + new
        last = start + len(old)
    return out + seq[last:]


def swap_answers(
    context_input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_docs: int,
    pad_id: int,
    eos_id: int,
    decoder_start_id: int,
    prob: float,
    generator: torch.Generator | None = None,
    donor_answers: Sequence[Sequence[int]] | None = None,
    max_length: int | None = None,
    cut_tail: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Swap answers between the examples of a batch, or for the given donors.

    context_input_ids (B*K, L) right-padded, contexts of example b in rows b*K..b*K+K-1; labels (B, T)
    the answer tokens then `</s>`, right-padded.  Each example is picked with probability `prob`; it takes
    the answer of another example (a random one with a different answer) wherever its own answer occurs in
    its contexts.  Examples whose answer occurs in none of their contexts are left alone.  ``donor_answers``
    (per example, answer token ids without ``</s>``; empty = none) replaces the batch's answers as the donors:
    a picked example takes its own donor (the data module draws one of the same relation).  No context outgrows
    ``max_length`` tokens (the contexts' limit; a longer answer standing several times in a passage would
    lengthen it past the positions the generator learned): with ``cut_tail`` (question-first contexts, whose
    tail is passage) a longer one loses its tail as ``build_contexts`` cuts a passage, keeping its last token
    (``</s>``); otherwise, or where the new answer would then stand in none of the example's contexts, the
    example is not swapped.  Returns new
    (context_input_ids, context_attention_mask, labels, decoder_input_ids), padded to their new widths.
    """
    batch = labels.shape[0]
    answers = [[t for t in row.tolist() if t not in (pad_id, eos_id)] for row in labels]
    contexts = [[t for t in row.tolist() if t != pad_id] for row in context_input_ids]
    picked = torch.rand(batch, generator=generator) < prob
    donors = torch.randint(0, max(batch - 1, 1), (batch,), generator=generator)
    new_answers = list(answers)
    for b in range(batch):
        if not picked[b] or not answers[b]:
            continue
        if donor_answers is not None:
            new = list(donor_answers[b])
        elif batch > 1:
            donor = int(donors[b]) + (int(donors[b]) >= b)  # any example but b itself
            new = answers[donor]
        else:
            continue
        if new == answers[b] or not new:
            continue
        rows = range(b * n_docs, (b + 1) * n_docs)
        if not any(_find(contexts[r], answers[b]) for r in rows):
            continue
        swapped = [_replace(contexts[r], answers[b], new) for r in rows]
        if max_length is not None and max(map(len, swapped)) > max_length:
            if not cut_tail:
                continue
            swapped = [c if len(c) <= max_length else c[: max_length - 1] + c[-1:] for c in swapped]
            if not any(_find(c, new) for c in swapped):
                continue
        for r, context in zip(rows, swapped, strict=True):
            contexts[r] = context
        new_answers[b] = new
    ctx_ids, ctx_mask = pad_right(contexts, pad_id)
    targets = [a + [eos_id] for a in new_answers]
    new_labels, _ = pad_right(targets, pad_id)
    decoder_input_ids, _ = pad_right([[decoder_start_id] + t[:-1] for t in targets], pad_id)
    return ctx_ids, ctx_mask, new_labels, decoder_input_ids


def drop_question_words(
    questions: list[list[int]],
    *,
    prob: float,
    mask_id: int | None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Each token of each question replaced by ``mask_id`` with probability ``prob`` (removed where the
    tokenizer has no mask token, ``mask_id`` None).

    Called on the question token ids before the contexts are built, so a question's copies in its k
    contexts get the same mask (one draw per question) and passage tokens are never touched.  The draws
    come from ``generator`` (the global torch generator, seeded by the run's seed, when None).
    """
    if prob <= 0 or not questions:
        return [list(q) for q in questions]
    draws = torch.rand(sum(len(q) for q in questions), generator=generator).lt(prob).tolist()
    out, start = [], 0
    for question in questions:
        dropped = draws[start : start + len(question)]
        start += len(question)
        if mask_id is None:
            out.append([t for t, d in zip(question, dropped, strict=True) if not d])
        else:
            out.append([mask_id if d else t for t, d in zip(question, dropped, strict=True)])
    return out
