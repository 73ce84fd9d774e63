"""How generator contexts are cut into pieces: every piece (question, separator, passage) is tokenised as
``" " + text.strip()``, so for byte-level BPE the concatenated ids equal the ids of the concatenated string.

The data module tokenises questions this way, the corpus store passages, and the retriever joins them with
:data:`SEPARATOR`; the generator's question-match feature looks for the same separator ids.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = " // "  # between question and passage in a generator context


def piece_ids(tokenizer: Any, text: str) -> list[int]:
    """Generator ids of one context piece: ``" " + text.strip()`` without special tokens.

    Every piece of a context starts with a space and ends without one, so for byte-level BPE the
    concatenated ids equal the ids of the concatenated string (the pre-tokeniser always splits before a
    space). Questions must be tokenised with this function too.
    """
    return list(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])
