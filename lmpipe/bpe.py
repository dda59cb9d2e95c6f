"""Byte-level BPE tokenizer: training on the warehouse's train split, saving, loading, special tokens.

The tokenizer is a ``tokenizers.Tokenizer`` saved as Hugging Face tokenizer JSON. Text is split by a
regex (GPT-4's or GPT-2's pre-tokenization pattern), each piece is mapped to bytes, and BPE merges
(Sennrich et al., 2016, https://arxiv.org/abs/1508.07909) are learned over bytes, as in GPT-2 (Radford
et al., 2019). With no normalizer and all 256 bytes in the base vocabulary, every UTF-8 string encodes
without unknown tokens and decodes back to exactly itself.

Ids ``0..5`` are the special tokens below, ``6..261`` the 256 bytes, then the merges in the order learned.
The ``tokenizer`` stage that trains it on the warehouse and writes the token shards is in
:mod:`lmpipe.shards`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmpipe.config import TokenizerConfig
from lmpipe.workspace import atomic_write_text

EOT = "<|endoftext|>"  # ends every document in the shards; generation stops on it
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # ends a chat turn
SPECIAL_TOKENS: tuple[str, ...] = (EOT, PAD, SYSTEM, USER, ASSISTANT, END)
EOT_ID, PAD_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))

# Pre-tokenization regexes: BPE never merges across the pieces they cut.
# GPT-2 (Radford et al., 2019): contractions, letters, digits, punctuation, whitespace runs.
# GPT-4 (the cl100k pattern): case-insensitive contractions, a word may take one leading non-letter
# (".method", "_case"), digits in groups of at most three, line breaks kept apart.
SPLIT_PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+""",
}


def new_tokenizer(split_pattern: str = "gpt4") -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the given pre-tokenization pattern."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERNS[split_pattern]), behavior="isolated"),
        # the regex already split the text; ByteLevel only maps each piece's bytes to printable symbols
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    batches: Iterable[list[str]], cfg: TokenizerConfig, length: int | None = None, progress: bool = False
) -> Tokenizer:
    """Learn BPE merges from ``batches`` of texts; ``length`` (number of texts) only feeds the progress bar."""
    tok = new_tokenizer(cfg.split_pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # first, so that they take ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=progress,
    )
    tok.train_from_iterator(batches, trainer, length=length)
    check_special_tokens(tok)
    return tok


def check_special_tokens(tok: Tokenizer) -> None:
    """Raise ValueError unless the special tokens hold ids 0..5 in the documented order."""
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(f"special tokens {SPECIAL_TOKENS} must have ids 0..{len(SPECIAL_TOKENS) - 1}, got {ids}")


def save_tokenizer(tok: Tokenizer, path: Path) -> str:
    """Write ``tok`` as tokenizer JSON (atomically); return the file's sha256."""
    text = tok.to_str(pretty=True)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer JSON written by :func:`save_tokenizer`, checking its special tokens.

    The returned tokenizer recognises special-token strings in the text it encodes (``"<|user|>hi"``
    gives the ``<|user|>`` id), which is what chat formatting wants. To encode untrusted text in
    which such strings must stay ordinary text, set ``tok.encode_special_tokens = True``.
    """
    tok = Tokenizer.from_file(str(path))
    check_special_tokens(tok)
    return tok


__all__ = [
    "ASSISTANT", "ASSISTANT_ID", "END", "END_ID", "EOT", "EOT_ID", "PAD", "PAD_ID", "SPECIAL_TOKENS", "SPLIT_PATTERNS",
    "SYSTEM", "SYSTEM_ID", "USER", "USER_ID", "check_special_tokens", "load_tokenizer", "new_tokenizer",
    "save_tokenizer", "train_tokenizer",
]
