"""Decoding rule: a word whose first pieces were copied from a passage is finished the way the passage spells it.

A generator trained from scratch writes a held-out name it never saw as an output by copying its pieces
from the context ("ĠTal" + "linn" for Tallinn). After the first piece its language model often prefers
the template's next token (a full stop) to the rare second piece, and the summary says "Tal." Words are
atomic in every passage, so a word the generator has begun by copying can only end where the passage's
word ends: while the letters written since the last word start occur in the contexts only as the
beginning of longer words, the next token must be one of the pieces that continue them there; the
generator's own scores pick among those. Where the letters also occur as a whole word, or do not occur
at all (the generator is not copying), nothing is constrained. Numbers and punctuation are never
constrained: "Ġ2" followed by "," in a passage may still end a number the generator writes itself.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers.decoders import ByteLevel
from torch import Tensor

_MAX_WORD_PIECES = 16  # a longer run of letter pieces is not a word this rule should hold on to


@dataclass(frozen=True)
class WordPieces:
    """Per vocabulary id: does the token begin a word of letters (``Ġ`` + letters, or a bare ``Ġ``), continue
    one (letters), or begin with a space (any word, number or sign that starts after a space)."""

    starts: tuple[bool, ...]
    continues: tuple[bool, ...]
    space_led: tuple[bool, ...] = ()
    prefix_space: bool = False  # the tokenizer puts a space before a text, so every target begins space-led

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> WordPieces:
        """Classes of a byte-level BPE vocabulary, read from each token's text (a leading space starts a word)."""
        bytes_to_text = ByteLevel()  # the tokenizer's own decoder strips the leading space this rule needs
        special = set(tokenizer.all_special_ids)
        starts, continues, space_led = [], [], []
        for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            text = bytes_to_text.decode([token]) if token is not None and token_id not in special else ""
            # a bare space begins a word whose letters follow in their own pieces (small vocabularies)
            starts.append(text.startswith(" ") and (text == " " or text[1:].isalpha()))
            continues.append(text.isalpha())
            space_led.append(text.startswith(" "))
        first = tokenizer("word", add_special_tokens=False)["input_ids"][:1]
        prefix_space = bool(first) and space_led[first[0]]
        return cls(tuple(starts), tuple(continues), tuple(space_led), prefix_space)


class CopiedWordCompletion:
    """Masks the next-token log-probs of hypotheses that are inside a word copied from their contexts.

    ``sources`` (n_rows, M, S): the context token ids each search row reads (RAG-Token: an example's M
    passages; RAG-Sequence: one passage per row); hypothesis ``r`` of a search with ``num_beams`` beams
    belongs to row ``r // num_beams``.
    """

    def __init__(self, sources: Tensor, pieces: WordPieces, num_beams: int) -> None:
        self.pieces = pieces
        self.num_beams = num_beams
        self.sources = [[list(context) for context in row] for row in sources.tolist()]
        self.where: list[dict[int, list[tuple[int, int]]]] = []  # per row: word-start token -> (context, position)
        for row in self.sources:
            found: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for m, context in enumerate(row):
                for position, token in enumerate(context):
                    if 0 <= token < len(pieces.starts) and pieces.starts[token]:
                        found[token].append((m, position))
            self.where.append(found)

    @classmethod
    def from_contexts(
        cls, context_input_ids: Tensor, context_attention_mask: Tensor, n_rows: int, pieces: WordPieces, num_beams: int
    ) -> CopiedWordCompletion:
        """The rule over (n_rows*M, S) contexts, M per search row; padding never counts as a word's next piece."""
        sources = context_input_ids.masked_fill(context_attention_mask.eq(0), -1)
        return cls(sources.view(n_rows, -1, sources.shape[-1]), pieces, num_beams)

    def _word(self, prefix: list[int]) -> list[int] | None:
        """The letters written since the last word start, as token ids, or None if the prefix is not in a word."""
        starts, continues = self.pieces.starts, self.pieces.continues
        for begin in range(len(prefix) - 1, max(len(prefix) - _MAX_WORD_PIECES, 0) - 1, -1):
            token = prefix[begin]
            if not 0 <= token < len(starts):
                return None
            if starts[token]:
                return prefix[begin:]
            if not continues[token]:
                return None
        return None

    def allowed(self, row: int, prefix: list[int]) -> set[int] | None:
        """The tokens that may come next for a hypothesis of search row ``row``; None: any token."""
        word = self._word(prefix)
        if word is None:
            return None
        following: set[int] = set()
        for m, position in self.where[row].get(word[0], ()):
            context = self.sources[row][m]
            end = position + len(word)
            if context[position:end] != word:
                continue
            after = context[end] if end < len(context) else None
            if after is None or not 0 <= after < len(self.pieces.continues) or not self.pieces.continues[after]:
                return None  # the passage has this word whole: it may end here
            following.add(after)
        return following or None

    def __call__(self, logprobs: Tensor, prefixes: Tensor) -> Tensor:
        """``logprobs`` (R, V) with -inf outside the allowed tokens of each constrained hypothesis."""
        masked = None
        for r, prefix in enumerate(prefixes.tolist()):
            allowed = self.allowed(r // self.num_beams, prefix)
            if allowed is None:
                continue
            if masked is None:
                masked = logprobs.clone()
            keep = torch.tensor(sorted(allowed), device=logprobs.device)
            row = torch.full_like(logprobs[r], -float("inf"))
            row[keep] = logprobs[r, keep]
            masked[r] = row
        return logprobs if masked is None else masked


class AnswerStartsAtWord:
    """Masks the first answer token to the pieces that begin with a space, and the specials before it.

    With a tokenizer that puts a space before every text (the world's), every training answer begins with a
    space-led piece; a copy that starts inside a passage's word ("šice" of Košice, "ers" of Algiers) never
    does. The first answer token is chosen where a hypothesis holds only the decoder start and BOS.
    """

    def __init__(self, pieces: WordPieces, specials: tuple[int | None, ...]) -> None:
        self.space_led = torch.tensor(pieces.space_led, dtype=torch.bool)
        self.specials = torch.tensor(sorted({i for i in specials if i is not None}), dtype=torch.long)
        self._allowed: Tensor | None = None  # (V,) on the logits' device, built at the first call

    def _allowed_first(self, vocab: int, device: torch.device) -> Tensor:
        if self._allowed is None or self._allowed.shape[0] != vocab or self._allowed.device != device:
            allowed = torch.zeros(vocab, dtype=torch.bool)
            known = min(len(self.space_led), vocab)
            allowed[:known] = self.space_led[:known]
            allowed[self.specials[self.specials < vocab]] = True
            self._allowed = allowed.to(device)
        return self._allowed

    def __call__(self, logprobs: Tensor, prefixes: Tensor) -> Tensor:
        first = torch.isin(prefixes, self.specials.to(prefixes.device)).all(dim=1)
        if not first.any():
            return logprobs
        allowed = self._allowed_first(logprobs.shape[1], logprobs.device)
        return logprobs.masked_fill(first[:, None] & ~allowed[None, :], -float("inf"))
