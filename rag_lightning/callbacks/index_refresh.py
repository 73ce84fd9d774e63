"""Keeps the index in step with a context encoder that trains (``model.train_context_encoder``).

Every ``model.index_refresh_every_n_steps`` optimizer steps it re-encodes the corpus and swaps in the new index
(``retrieval/refresh.py``: written beside the old one in ``<run dir>/index``, then swapped atomically); a resumed
run searches the index it searched when its checkpoint was written; a test of another checkpoint (the best)
searches an index of that checkpoint's weights. The pipeline adds it when the context encoder trains.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from rag_lightning.config import IndexConfig
from rag_lightning.models.encoders import encoder_fingerprint
from rag_lightning.retrieval.faiss_index import IndexStateError
from rag_lightning.retrieval.refresh import Refreshed, current_index, open_index, refresh, use_matching

log = logging.getLogger(__name__)


class IndexRefresh(L.Callback):
    """Re-encodes the corpus every ``every_n_steps`` optimizer steps (0: never) into ``root``; logs
    ``index/refreshes`` and ``index/refresh_s`` (seconds of the last one, ``index/encode_s`` of it encoding)."""

    def __init__(self, every_n_steps: int, root: str | Path, index: IndexConfig, test_root: str | Path | None = None) -> None:
        """``root``: where training refreshes go; ``test_root`` (default ``<root>_test``): the index of a tested
        checkpoint whose weights no refresh matches, kept apart so a resume still finds training's."""
        self.every_n_steps, self.root, self.index = every_n_steps, Path(root), index
        self.test_root = Path(test_root) if test_root is not None else self.root.with_name(self.root.name + "_test")
        self.refreshes = 0
        self.in_use: str | None = None  # fingerprint of the refreshed index searched now (None: the starting one)
        self.last_step = -1

    # ---------------------------------------------------------------- state (in checkpoints)
    def state_dict(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes, "in_use": self.in_use, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refreshes = int(state_dict.get("refreshes", 0))
        self.in_use = state_dict.get("in_use")
        self.last_step = int(state_dict.get("last_step", -1))

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """A resumed run: search the refreshed index its checkpoint searched, or (gone: a later refresh replaced
        it) one of the checkpoint's weights."""
        if self.in_use is None:
            return
        directory = current_index(self.root)
        if directory is not None:
            try:
                pl_module.retriever.swap_index(*open_index(directory, self.in_use, self.index))
                log.info("resumed with the refreshed index %s (refresh %d, step %d)", directory, self.refreshes,
                         self.last_step)
                return
            except IndexStateError:
                pass
        log.warning("the index refreshed at step %d is gone from %s: re-encoding the corpus with the checkpoint's "
                    "context encoder", self.last_step, self.root)
        self._record(pl_module, refresh(pl_module.retriever, pl_module.context_encoder, self.root, self.index,
                                        trainer.global_step), trainer.global_step, count=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == self.last_step:
            return
        self.last_step = step
        fingerprint = encoder_fingerprint(pl_module.context_encoder)
        if fingerprint == (getattr(pl_module.retriever.index, "manifest", None) or {}).get("encoder_fingerprint"):
            return  # not trained since (the warm-up): the index is current
        done = refresh(pl_module.retriever, pl_module.context_encoder, self.root, self.index, step)
        self._record(pl_module, done, step)

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """The tested checkpoint (the best) may hold other weights than the last refresh: search theirs."""
        done = use_matching(pl_module.retriever, pl_module.context_encoder, [self.root, self.test_root], self.index,
                            trainer.global_step)
        if done is not None:
            log.info("test: searching the index of the tested context encoder, %s", done.directory)

    def _record(self, pl_module: Any, done: Refreshed, step: int, count: bool = True) -> None:
        self.in_use = done.fingerprint
        self.refreshes += int(count)
        what = f"index refresh {self.refreshes}" if count else "index re-encoded for the resumed checkpoint"
        log.info("%s at step %d: %s (encode %.1fs, in all %.1fs)", what, step, done.directory, done.encode_s,
                 done.total_s)
        if count:  # from on_train_batch_end, where Lightning takes logged values
            pl_module.log("index/refreshes", float(self.refreshes))
            pl_module.log("index/refresh_s", done.total_s)
            pl_module.log("index/encode_s", done.encode_s)
