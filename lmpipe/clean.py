"""Normalise document text and filter documents by length.

`normalize` makes text comparable for deduplication and training: Unicode NFKC, one newline convention, no
control or invisible characters, single spaces, at most one blank line in a row. Non-Latin scripts pass
through unchanged apart from NFKC (which, intentionally, turns full-width ASCII letters into ASCII).

The filters follow a small protocol: a filter is called with a text and returns (True, None) to keep it or
(False, reason) to drop it; `apply_filters` runs a chain and counts drops per reason.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from lmpipe.sources import LineBlock

_LINE_BREAKS = "\x85\u2028\u2029"  # NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR: become "\n" so words stay apart
_SPACES = "\t\x0b\x0c\u00a0\u1680\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
# Invisible format characters that make equal-looking text compare unequal: soft hyphen, zero-width space,
# word joiner, BOM. ZWJ (U+200D) stays because emoji sequences need it, ZWNJ (U+200C) because Persian and
# Indic spelling does.
_INVISIBLE = "\u00ad\u200b\u2060\ufeff"

_TRANSLATION: dict[int, str | None] = {
    # Control characters (Cc) except NUL, which normalize removes up front because normalize_many uses it.
    **{code: None for code in [*range(1, 0x20), *range(0x7F, 0xA0)]},
    **{ord(ch): " " for ch in _SPACES},  # "\t", "\v" and "\f" are spaces rather than controls here,
    **{ord(ch): "\n" for ch in "\r" + _LINE_BREAKS},  # "\r" and NEL line breaks
    **{ord(ch): None for ch in _INVISIBLE},
    **{code: None for code in range(0xD800, 0xE000)},  # lone surrogates (from JSON escapes) cannot be encoded
}
del _TRANSLATION[ord("\n")]


def _needs_work(ch: str) -> bool:
    """Whether `ch` is translated, is a combining mark, or is changed by NFKC.

    NFKC of a string equals the concatenation of NFKC of pieces cut before any character that has combining
    class 0, is unchanged by NFKC and is not the second character of a canonical composition; characters that
    fail the first two tests are found here, composition seconds by `_composition_seconds`.
    """
    if ord(ch) in _TRANSLATION or unicodedata.combining(ch):
        return True
    # Only characters with a decomposition mapping can change under NFKC; checking it first is cheaper.
    return bool(unicodedata.decomposition(ch)) and unicodedata.normalize("NFKC", ch) != ch


def _composition_seconds() -> set[int]:
    """BMP characters that can combine with the character before them (composites in the BMP only have these)."""
    hangul_vowels_and_finals = {*range(0x1161, 0x1176), *range(0x11A8, 0x11C3)}  # composed algorithmically
    seconds = set(hangul_vowels_and_finals)
    for code in range(0x10000):
        parts = unicodedata.decomposition(chr(code)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(int(parts[1], 16))
    return {code for code in seconds if code < 0x10000}


def _special_pattern() -> re.Pattern[str]:
    """Runs of characters that need translation or NFKC; every character outside the BMP counts as one.

    Listing astral characters one range at a time would stop `re` from using its fast BMP bitmap, which
    costs more than the few extra matches emoji and rare CJK ideographs cause.
    """
    codes = sorted({c for c in range(0x10000) if _needs_work(chr(c))} | _composition_seconds())
    ranges, start, previous = [], codes[0], codes[0]
    for code in [*codes[1:], -1]:
        if code != previous + 1:
            ranges.append(re.escape(chr(start)) + ("-" + re.escape(chr(previous)) if previous > start else ""))
            start = code
        previous = code
    return re.compile("[" + "".join(ranges) + "\U00010000-\U0010ffff]+")


_SPECIAL = _special_pattern()
_SPACE_RUNS = re.compile("  +")
_BLANK_LINES = re.compile("\n\n\n+")

# normalize_many joins texts with NUL between newlines. normalize removes NUL before anything else, so
# inputs without NUL give the same result while NUL itself survives the joined pass untouched (it is
# neither special nor whitespace); being ASCII it keeps an all-ASCII join in Python's compact 1-byte form.
# The newlines keep NFKC and the space rules from acting across the boundary, and disappear when each
# part is stripped.
_SEPARATOR = "\x00"
_JOINER = f"\n{_SEPARATOR}\n"
# Texts are joined in batches of about this many characters: enough to amortise the per-call costs, few
# enough that the passes over a batch stay in cache and the copies stay small.
_BATCH_CHARS = 1 << 16


# The same character rules for all-ASCII text, as one C-speed bytes pass (NFKC leaves ASCII unchanged).
_ASCII_TABLE = bytes.maketrans(b"\t\x0b\x0c\r", b"   \n")
_ASCII_DELETE = bytes(code for code in [*range(1, 0x20), 0x7F] if code not in b"\t\n\x0b\x0c\r")


def _fix_specials(text: str) -> str:
    """Translate characters and apply NFKC, touching only the segments that can change.

    Each run of special characters is normalised together with the character before it (which it might
    compose with); cutting before any other character leaves NFKC's result unchanged, and skipping the rest
    of the text is what makes this fast for mostly-ASCII or CJK text.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_TABLE, _ASCII_DELETE).decode("ascii")
    pieces, done = [], 0
    for match in _SPECIAL.finditer(text):
        start, end = match.span()
        if start > done:
            start -= 1
        pieces.append(text[done:start])
        # Translation before NFKC, so that a removed character cannot block a composition.
        pieces.append(unicodedata.normalize("NFKC", text[start:end].translate(_TRANSLATION)))
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def _normalize_joined(text: str) -> str:
    """Every rule of `normalize` except NUL removal and the final strip; they act within lines or across newlines."""
    text = _fix_specials(text.replace("\r\n", "\n"))
    text = _SPACE_RUNS.sub(" ", text)
    # After collapsing there is at most one space on either side of a newline.
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    return _BLANK_LINES.sub("\n\n", text)


def normalize(text: str) -> str:
    """Return `text` in NFKC with "\\n" newlines, no control or invisible characters and collapsed spaces.

    NUL is removed first; carriage returns, NEL and U+2028/U+2029 become "\\n"; other control characters,
    soft hyphens, U+200B, U+2060, U+FEFF and lone surrogates are removed; tabs, "\\v", "\\f" and Unicode
    spaces become a space; runs of spaces collapse; spaces at line starts and ends go; three or more newlines
    become two; the result is stripped.
    """
    return _normalize_joined(text.replace(_SEPARATOR, "")).strip()


def _normalize_joined_texts(texts: list[str]) -> list[str]:
    joined = _JOINER.join(texts)
    if joined.count(_SEPARATOR) != len(texts) - 1:
        return [normalize(text) for text in texts]  # some text contains NUL
    return [part.strip() for part in _normalize_joined(joined).split(_SEPARATOR)]


def _batches(indices: list[int], texts: Sequence[str]) -> Iterator[list[int]]:
    batch, size = [], 0
    for index in indices:
        batch.append(index)
        size += len(texts[index])
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def normalize_many(texts: Sequence[str]) -> list[str]:
    """Return `[normalize(t) for t in texts]`, computed on batches of joined texts (faster for short texts)."""
    result = [""] * len(texts)
    # ASCII texts are joined apart from the rest: one non-ASCII character makes Python store a whole joined
    # string with 2 or 4 bytes per character, and all-ASCII text takes a faster path.
    ascii_indices = [i for i, text in enumerate(texts) if text.isascii()]
    other_indices = [i for i, text in enumerate(texts) if not text.isascii()]
    for indices in (ascii_indices, other_indices):
        for batch in _batches(indices, texts):
            cleaned = _normalize_joined_texts([texts[i] for i in batch])
            for index, text in zip(batch, cleaned, strict=True):
                result[index] = text
    return result


class TextFilter(Protocol):
    """A document filter: (True, None) keeps the text, (False, reason) drops it."""

    def __call__(self, text: str) -> tuple[bool, str | None]: ...


@dataclass(frozen=True)
class LengthFilter:
    """Drop texts that are empty (only whitespace), shorter than `min_chars` or longer than `max_chars`.

    `min_words` counts whitespace-separated tokens, which unsegmented scripts such as Chinese lack; leave it 0
    for such corpora. Too few words is reported as "too_short".
    """

    min_chars: int = 0
    max_chars: int | None = None
    min_words: int = 0

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.min_words < 0:
            raise ValueError("min_chars and min_words must be >= 0")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars must be >= min_chars")

    def __call__(self, text: str) -> tuple[bool, str | None]:
        """Return (True, None) to keep `text`, else (False, "empty" | "too_short" | "too_long")."""
        if not text or text.isspace():
            return False, "empty"
        if len(text) < self.min_chars:
            return False, "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return False, "too_long"
        if self.min_words and len(text.split()) < self.min_words:
            return False, "too_short"
        return True, None


def apply_filters(texts: Iterable[str], filters: Sequence[TextFilter]) -> tuple[list[int], Counter[str]]:
    """Run the filter chain over `texts`; return the indices kept and how many were dropped per reason.

    A text is dropped by the first filter that rejects it, so each drop is counted once.
    """
    kept: list[int] = []
    dropped: Counter[str] = Counter()
    for index, text in enumerate(texts):
        for check in filters:
            keep, reason = check(text)
            if not keep:
                dropped[reason or "unspecified"] += 1
                break
        else:
            kept.append(index)
    return kept, dropped


# ----------------------------------------------------------------------------------------------
# one chunk of an ingested source (run in cleaning worker processes)


def text_hash(normalized: str) -> str:
    """md5 of a normalised text: the exact-dedup key and the seed of its split."""
    return hashlib.md5(normalized.encode("utf-8")).hexdigest()


def dedup_keys(hashes: Sequence[str]) -> np.ndarray:
    """The first 64 bits of each hex md5 as unsigned integers: cheap to send between processes and to look up."""
    return np.frombuffer(bytes.fromhex("".join([h[:16] for h in hashes])), dtype=">u8").astype(np.uint64)


def clean_block(block: LineBlock, min_chars: int, max_chars: int) -> tuple[int, tuple[pa.Table, np.ndarray, Counter]]:
    """Decode, split and clean a block of raw lines: (documents read, :func:`clean_chunk`'s result)."""
    lines, texts = block.lines()
    return len(texts), clean_chunk(lines, texts, None, min_chars, max_chars)


def clean_texts(lines: list[int], texts: list[str], min_chars: int, max_chars: int
                ) -> tuple[int, tuple[pa.Table, np.ndarray, Counter]]:
    """(documents read, :func:`clean_chunk`'s result) for texts already read."""
    return len(texts), clean_chunk(lines, texts, None, min_chars, max_chars)


def clean_chunk(
    lines: list[int], texts: list[str], objects: list[str | None] | None, min_chars: int, max_chars: int
) -> tuple[pa.Table, np.ndarray, Counter]:
    """Normalise, length-filter and hash one chunk: (kept rows as a table, their dedup keys, drop counts).

    Module-level in a light module so that worker processes start fast and can run it; building the Arrow
    columns here keeps that cost off the reading process too.
    """
    cleaned = normalize_many(texts)
    keep, dropped = apply_filters(cleaned, [LengthFilter(min_chars=max(min_chars, 1), max_chars=max_chars)])
    kept = [cleaned[i] for i in keep]
    hashes = [text_hash(t) for t in kept]
    table = pa.table({
        "line": pa.array([lines[i] for i in keep], pa.int32()),
        "text": pa.array(kept, pa.string()),
        "hash": pa.array(hashes, pa.string()),
        "object": pa.array([objects[i] for i in keep] if objects else [None] * len(keep), pa.string()),
    })
    return table, dedup_keys(hashes), dropped
