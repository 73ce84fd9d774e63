"""A small BART-style byte-level BPE tokenizer for generators trained from scratch on a corpus.

Special tokens sit where BART has them (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, then ``<mask>``=4),
so code written for BART's ids works unchanged, and a single text is wrapped as ``<s> ... </s>``.

Prefix space: the pre-tokenizer adds a space before a text that does not start with one
(``add_prefix_space=True``), so every word, the first included, is tokenised as "space + word". Hence
pieces tokenised separately (``add_special_tokens=False``) concatenate to exactly the ids of the pieces
joined by single spaces::

    ids(question) + ids("/") + ids(title) == ids(question + " / " + title)

which lets the corpus store tokenise passages once and splice them after any question. Decoding strips
the one leading space again, so ``decode(encode(text)) == text`` for text without a leading space.

Training is deterministic: the same texts in the same order give a byte-identical ``tokenizer.json``,
across processes too (tests/test_world.py checks it; the world build compares whole builds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS, PAD, EOS, UNK, MASK = SPECIAL_TOKENS
ADD_PREFIX_SPACE = True
DEFAULT_VOCAB_SIZE = 6000
# BPE training time grows much faster than linearly in a word's length (a 300 KB word: 92 s, 5 MB: hours),
# and no merge of a word this long is worth a vocabulary slot: longer words are cut to this many characters
MAX_WORD_CHARS = 100
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")

log = logging.getLogger(__name__)


class _CutLongWords:
    """The texts with every word (run of non-space characters) cut to ``MAX_WORD_CHARS``, counting the cuts."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts, self.cut, self.longest = texts, 0, 0

    def _cut(self, match: re.Match[str]) -> str:
        self.cut += 1
        self.longest = max(self.longest, len(match.group()))
        return match.group()[:MAX_WORD_CHARS]

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            yield _LONG_WORD.sub(self._cut, text) if len(text) > MAX_WORD_CHARS else text


def _bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=ADD_PREFIX_SPACE)
    # ByteLevel decodes to one string; Strip then removes the single space the pre-tokenizer added.
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    return tok


def _bart_post_processor() -> processors.TemplateProcessing:
    """BART's layout: ``<s> A </s>`` and, for pairs, ``<s> A </s> </s> B </s>``."""
    return processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, 0), (EOS, 2)],
    )


def _wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        mask_token=MASK,
        cls_token=BOS,
        sep_token=EOS,
        model_max_length=model_max_length,
    )


def train_generator_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 2,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and save it to ``out_dir`` as a transformers tokenizer directory.

    No seed is needed: training has no randomness, so the texts and their order decide the result.
    Words longer than ``MAX_WORD_CHARS`` are cut to that length for training (with a warning).
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges; use at least 1000")
    tok = _bpe_tokenizer()
    specials = [BOS, PAD, EOS, UNK, AddedToken(MASK, lstrip=True, normalized=False)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    capped = _CutLongWords(texts)
    tok.train_from_iterator(capped, trainer=trainer)
    if capped.cut:
        log.warning(
            "generator tokenizer: %d word(s) longer than %d characters (the longest %d) were cut to that length "
            "for training; check the data for run-together text",
            capped.cut,
            MAX_WORD_CHARS,
            capped.longest,
        )
    tok.post_processor = _bart_post_processor()
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS))), f"special token ids {ids} differ from BART's"
    wrapped = _wrap(tok, model_max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return wrapped


def load_generator_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory written by ``train_generator_tokenizer`` (or any tokenizer.json directory)."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no generator tokenizer at {p} (tokenizer.json missing): run `rag-prepare` for the world data set, "
            "or point data.generator_tokenizer at a tokenizer directory"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(p))


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's token -> id map: what a trained generator's weights are tied to. Two tokenizers
    trained on other texts (a world build of another format) differ here even at the same vocabulary size."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
