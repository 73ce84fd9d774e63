"""The passage side trained against the whole corpus: a bank of passage vectors refreshed from cached states.

Scoring each question against every passage (``dpr.corpus_negatives``) is the exact retrieval softmax, but
with a trained context encoder it would need the corpus re-encoded at every step. As ANCE does (Xiong et al.,
2021), the softmax runs over a bank of passage vectors refreshed every N steps, while the passages whose
gradient matters (each question's positive and its highest-scoring bank negatives) are encoded fresh, with
gradient. Only the context encoder's top layers train, so the frozen bottom's states of every passage are
computed once and both the refresh and the fresh encodings start from them; with DPR's [CLS] pooling the last
layer runs at [CLS] only. On 2 CPU cores and the world corpus (7,209 passages, ~65 tokens each): the states
~85 s once (~0.7 GB of float32), a refresh ~3 s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from rag_lightning.models.encoder_split import encode_bottom, encode_top
from rag_lightning.padding import pad_right


class PassageBank:
    """Every passage's hidden states below the context encoder's top ``layers`` layers, concatenated over
    tokens (T, d) with each passage's start in ``offsets`` (N + 1,)."""

    def __init__(self, states: torch.Tensor, offsets: torch.Tensor, layers: int) -> None:
        if offsets.ndim != 1 or int(offsets[-1]) != states.shape[0]:
            raise ValueError(f"offsets end at {int(offsets[-1])} but there are {states.shape[0]} token states")
        self.states, self.offsets, self.layers = states, offsets.long(), layers
        self.lengths = self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encoder: nn.Module,
        passages: Sequence[np.ndarray],
        layers: int,
        pad_id: int,
        batch_size: int = 128,
        progress: bool = True,
    ) -> PassageBank:
        """States of every passage (token ids, as the corpus store holds them) after the frozen bottom of
        ``encoder``, without dropout; batches of similar lengths so little is padding."""
        lengths = np.array([len(p) for p in passages], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        device = next(encoder.parameters()).device
        states: torch.Tensor | None = None
        order = np.argsort(lengths, kind="stable")
        columns = (TextColumn("passage states"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("states", total=len(order))
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                ids, mask = pad_right([passages[int(r)] for r in rows], pad_id)
                out = encode_bottom(encoder, ids.to(device), mask.to(device), layers).float()
                if states is None:
                    states = out.new_empty(int(offsets[-1]), out.shape[-1])
                for i, row in enumerate(rows):
                    states[int(offsets[row]) : int(offsets[row + 1])] = out[i, : int(lengths[row])]
                bar.advance(task, len(rows))
        if states is None:
            raise ValueError("no passages to build a bank from")
        return cls(states, torch.from_numpy(offsets), layers)

    def to(self, device: torch.device | str) -> PassageBank:
        if self.states.device == torch.device(device):
            return self
        return PassageBank(self.states.to(device), self.offsets.to(device), self.layers)

    def padded(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The states (B, L, d) of corpus ``rows``, right-padded with zeros, and their (B, L) 0/1 mask."""
        rows = rows.to(self.offsets.device)
        lengths = self.lengths[rows]
        positions = torch.arange(int(lengths.max()), device=rows.device)
        mask = positions[None, :] < lengths[:, None]
        index = torch.where(mask, self.offsets[rows][:, None] + positions[None, :], 0)
        return self.states[index] * mask[..., None], mask.long()

    def encode(self, encoder: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """Vectors (B, d) of corpus ``rows`` through the top layers, in the encoder's mode (with gradient)."""
        states, mask = self.padded(rows)
        return encode_top(encoder, states, mask, self.layers, cls_only=True)

    @torch.no_grad()
    def vectors(self, encoder: nn.Module, batch_size: int = 128) -> torch.Tensor:
        """Every passage's vector (N, d) in eval mode: what a fresh encoding of the corpus gives."""
        was_training = encoder.training
        encoder.eval()
        try:
            order = torch.argsort(self.lengths.cpu(), stable=True).to(self.offsets.device)
            out: torch.Tensor | None = None
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                vectors = self.encode(encoder, rows).float()
                if out is None:
                    out = vectors.new_empty(len(self), vectors.shape[-1])
                out[rows] = vectors
        finally:
            encoder.train(was_training)
        assert out is not None
        return out
