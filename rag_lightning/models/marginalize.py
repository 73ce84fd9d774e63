"""RAG marginal likelihoods as pure tensor functions (Lewis et al., 2020, eqs. 1-2).

Shapes shared by every function here:

* ``seq_logits`` (B*K, T, V): generator logits on the B*K (question, passage) contexts; the K contexts of
  example ``b`` are rows ``b*K .. b*K+K-1`` (the order ``repeat_interleave`` gives).
* ``doc_scores`` (B, K): retriever scores; ``log p(z|x)`` is their ``log_softmax`` over K.
* ``labels`` (B, T): targets aligned with the logits (logit position t predicts ``labels[:, t]``), i.e. the
  decoder inputs shifted left (see :func:`shift_targets`); ``pad_token_id`` positions are ignored.

All arithmetic is float32 and in log space, so long answers, large K or bf16/fp16 logits neither underflow
nor lose the doc prior. Label smoothing and BOS exclusion follow transformers' ``RagSequenceForGeneration``
/ ``RagTokenForGeneration.get_nll`` so the numbers agree on the same inputs (the docstrings note the two
corner cases where they deliberately do not).
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("none", "sum", "mean", "token_mean")


def shift_targets(decoder_input_ids: Tensor, pad_token_id: int) -> Tensor:
    """Targets for teacher forcing: decoder inputs shifted one step left, the last position padded.

    Converts transformers' RAG convention (``labels`` are the decoder inputs) into this module's one
    (``labels[:, t]`` is what logit position ``t`` predicts).
    """
    pad = decoder_input_ids.new_full((decoder_input_ids.shape[0], 1), pad_token_id)
    return torch.cat([decoder_input_ids[:, 1:], pad], dim=1)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_shapes(seq_logits: Tensor, doc_scores: Tensor | None, labels: Tensor) -> int:
    """Validates the documented shapes; returns K (1 without retrieval)."""
    if labels.dim() != 2 or seq_logits.dim() != 3:
        raise ValueError(
            f"expected labels (B, T) and logits (B*K, T, V), got {tuple(labels.shape)}, {tuple(seq_logits.shape)}"
        )
    batch, length = labels.shape
    n_docs = 1 if doc_scores is None else doc_scores.shape[1]
    if doc_scores is not None and (doc_scores.dim() != 2 or doc_scores.shape[0] != batch):
        raise ValueError(f"doc_scores must be (B={batch}, K), got {tuple(doc_scores.shape)}")
    if seq_logits.shape[:2] != (batch * n_docs, length):
        raise ValueError(
            f"logits must be (B*K={batch * n_docs}, T={length}, V), got {tuple(seq_logits.shape)}"
        )
    return n_docs


def _token_logprobs(
    logits: Tensor, labels: Tensor, pad_token_id: int, with_vocab_sum: bool
) -> tuple[Tensor, Tensor | None]:
    """log p(label_t) per position, and sum_v log p(v) when label smoothing needs it; float32.

    ``labels`` has one row per logits row; pad positions get a dummy (finite) value the caller masks. A
    float32 ``log_softmax`` then ``gather`` is about 3x faster in backward than ``gather - logsumexp``.
    """
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
    safe = labels.masked_fill(labels.eq(pad_token_id), 0).unsqueeze(-1)
    target = logprobs.gather(-1, safe).squeeze(-1)
    return target, (logprobs.sum(dim=-1) if with_vocab_sum else None)


def _smoothed(nll: Tensor, smooth: Tensor, label_smoothing: float, vocab_size: int) -> Tensor:
    """(1 - eps) * nll + eps / V * smooth, the fairseq / transformers label-smoothed objective."""
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll + (label_smoothing / vocab_size) * smooth


def _reduce(per_example: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Applies one of ``REDUCTIONS``; ``token_mean`` divides by the number of non-pad targets."""
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return per_example.sum()
    if reduction == "mean":
        return per_example.mean()
    return per_example.sum() / mask.sum().clamp(min=1)


def closed_book_nll(
    logits: Tensor,
    labels: Tensor,
    *,
    pad_token_id: int,
    label_smoothing: float = 0.0,
    reduction: str = "none",
) -> Tensor:
    """Plain seq2seq NLL, -sum_t log p(y_t|x, y_<t): the no-retrieval baseline.

    Equals both RAG losses with K=1, and ``F.cross_entropy(..., label_smoothing=eps, reduction="sum")``
    per example.
    """
    _check_reduction(reduction)
    _check_shapes(logits, None, labels)
    mask = labels.ne(pad_token_id)
    target, vocab_sum = _token_logprobs(logits, labels, pad_token_id, with_vocab_sum=label_smoothing != 0.0)
    nll = -torch.where(mask, target, 0.0).sum(dim=1)
    smooth = -torch.where(mask, vocab_sum, 0.0).sum(dim=1) if vocab_sum is not None else torch.zeros_like(nll)
    return _reduce(_smoothed(nll, smooth, label_smoothing, logits.shape[-1]), mask, reduction)


def rag_sequence_nll(
    seq_logits: Tensor,
    doc_scores: Tensor,
    labels: Tensor,
    *,
    pad_token_id: int,
    exclude_bos_score: bool = False,
    bos_token_id: int | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "none",
) -> Tensor:
    """RAG-Sequence NLL: -log sum_z p(z|x) prod_t p(y_t|x,z,y_<t).

    ``exclude_bos_score`` drops the score of the first target from the likelihood term when every row's
    first target is ``bos_token_id`` (BART is forced to emit it, so it says nothing about the answer; a
    batch-level rule, as in transformers, so that candidates ranked together are scored alike). The label
    smoothing term is transformers' one: ``-logsumexp_z(sum_t sum_v log p(v|x,z,y_<t) + V log p(z|x))``
    (the BOS position stays in it), mixed as ``(1-eps) * nll + eps/V * smooth``.

    One deliberate difference from transformers' ``get_nll``: the doc prior is always counted once, where
    transformers adds it at target position 1 and so loses it for single-token targets. Rows without any
    target get exactly 0.
    """
    _check_reduction(reduction)
    _check_shapes(seq_logits, doc_scores, labels)
    if exclude_bos_score and bos_token_id is None:
        raise ValueError("exclude_bos_score=True needs bos_token_id")
    skip = exclude_bos_score and bool(labels[:, 0].eq(bos_token_id).all())
    skip_first = torch.full((labels.shape[0],), skip, dtype=torch.bool, device=labels.device)
    loss = sequence_nll_per_example(seq_logits, doc_scores, labels, pad_token_id, skip_first, label_smoothing)
    return _reduce(loss, labels.ne(pad_token_id), reduction)


def sequence_nll_per_example(
    seq_logits: Tensor,
    doc_scores: Tensor,
    labels: Tensor,
    pad_token_id: int,
    skip_first: Tensor,
    label_smoothing: float = 0.0,
) -> Tensor:
    """:func:`rag_sequence_nll` (B,) with the BOS exclusion decided per row by ``skip_first`` (B,) bool.

    For callers that batch several independent groups (the thorough decoder scores the candidates of many
    examples in one pass) and must apply transformers' per-group BOS rule themselves.
    """
    n_docs = _check_shapes(seq_logits, doc_scores, labels)
    batch, length = labels.shape
    vocab_size = seq_logits.shape[-1]
    mask = labels.ne(pad_token_id)
    doc_logprobs = doc_scores.float().log_softmax(dim=-1)  # (B, K)

    target, vocab_sum = _token_logprobs(
        seq_logits,
        labels.repeat_interleave(n_docs, dim=0),
        pad_token_id,
        with_vocab_sum=label_smoothing != 0.0,
    )
    target = target.view(batch, n_docs, length)

    scored = mask.clone()
    scored[:, 0] &= ~skip_first
    seq_ll = torch.where(scored.unsqueeze(1), target, 0.0).sum(dim=2) + doc_logprobs  # (B, K)
    nll = -seq_ll.logsumexp(dim=1)

    smooth = torch.zeros_like(nll)
    if vocab_sum is not None:
        vocab_sum = vocab_sum.view(batch, n_docs, length)
        smooth_obj = torch.where(mask.unsqueeze(1), vocab_sum, 0.0).sum(dim=2) + vocab_size * doc_logprobs
        smooth = -smooth_obj.logsumexp(dim=1)
    loss = _smoothed(nll, smooth, label_smoothing, vocab_size)
    return torch.where(mask.any(dim=1), loss, 0.0)


def rag_token_nll(
    seq_logits: Tensor,
    doc_scores: Tensor,
    labels: Tensor,
    *,
    pad_token_id: int,
    label_smoothing: float = 0.0,
    reduction: str = "none",
) -> Tensor:
    """RAG-Token NLL: -sum_t log sum_z p(z|x) p(y_t|x,z,y_<t).

    Label smoothing uses the sum over the vocabulary of the *marginal* log-probs, as transformers does; only
    then is the (B, T, V) marginal materialised, otherwise just the target entries are mixed.
    """
    _check_reduction(reduction)
    n_docs = _check_shapes(seq_logits, doc_scores, labels)
    batch, length = labels.shape
    vocab_size = seq_logits.shape[-1]
    mask = labels.ne(pad_token_id)
    doc_logprobs = doc_scores.float().log_softmax(dim=-1)  # (B, K)
    safe = labels.masked_fill(~mask, 0)

    if label_smoothing == 0.0:
        target, _ = _token_logprobs(seq_logits, labels.repeat_interleave(n_docs, dim=0), pad_token_id, False)
        marginal_target = (target.view(batch, n_docs, length) + doc_logprobs.unsqueeze(-1)).logsumexp(dim=1)
        smooth = torch.zeros(batch, device=seq_logits.device)
    else:
        logprobs = seq_logits.log_softmax(dim=-1, dtype=torch.float32).view(batch, n_docs, length, vocab_size)
        marginal = (logprobs + doc_logprobs[:, :, None, None]).logsumexp(dim=1)  # (B, T, V)
        marginal_target = marginal.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        smooth = -torch.where(mask, marginal.sum(dim=-1), 0.0).sum(dim=1)
    nll = -torch.where(mask, marginal_target, 0.0).sum(dim=1)
    return _reduce(_smoothed(nll, smooth, label_smoothing, vocab_size), mask, reduction)
