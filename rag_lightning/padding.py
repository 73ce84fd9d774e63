"""Right-padding of ragged token-id rows into (ids, attention mask) tensors: one place for every batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_right(rows: Sequence[Sequence[int] | np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) int64 ids padded with `pad_id` to the longest row (at least 1), and the (N, L) 0/1 mask."""
    width = max([len(r) for r in rows] + [1])
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
