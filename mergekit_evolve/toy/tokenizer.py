"""Character-level tokenizer shared by every toy model.

One token per character (printable ASCII, newline and the Japanese numerals
〇一二三四五六七八九), so a digit and its numeral are single, comparable tokens and
exact-match scoring sees every character.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["JA_DIGITS", "PAD", "EOS", "UNK", "VOCAB", "make_tokenizer"]

JA_DIGITS = "〇一二三四五六七八九"
"""Japanese numerals for 0-9, indexed by digit value."""

PAD = "<pad>"
EOS = "</s>"
UNK = "<unk>"

# Order is part of the on-disk format of every toy model: append, never reorder.
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127)) + JA_DIGITS
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *_CHARS])}
"""Token to id; ids 0-2 are ``<pad>``, ``</s>`` and ``<unk>``."""

assert len(set(_CHARS)) == len(_CHARS)
assert set(string.digits) <= set(_CHARS)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer used by the toy zoo.

    The tokenizer splits on every character (regex ``[\\s\\S]``; Oniguruma rejects
    ``(?s).``), adds no special tokens when encoding, and pads on the left, as batched
    generation with a decoder-only model needs.

    Returns:
        A ``PreTrainedTokenizerFast`` that saves and reloads offline with
        ``AutoTokenizer``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Characters are whole tokens: join them back with no separator.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )
