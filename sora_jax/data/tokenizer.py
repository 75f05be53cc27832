"""An offline word tokenizer that needs no vocabulary file: the hashing trick.

Captions are lower-cased and split into words and punctuation; each piece maps to
`2 + crc32(piece) % (vocab_size - 2)`. Id 0 is padding and id 1 marks the end of
the text. There is nothing to download or train, every string has an encoding,
and collisions are rare at the default vocabulary (the toy world's whole caption
grammar has a few hundred distinct words; `collisions()` lets a test check).
A user who wants a learned tokenizer or a big frozen encoder instead can store
precomputed text embeddings in the data set (see docs/data.md).
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
_SPLIT = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class HashTokenizer:
    def __init__(self, vocab_size: int = 8192, max_len: int = 96):
        if vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.max_len = int(max_len)

    def pieces(self, text: str) -> list[str]:
        return _SPLIT.findall(text.lower())

    def piece_id(self, piece: str) -> int:
        return 2 + zlib.crc32(piece.encode("utf-8")) % (self.vocab_size - 2)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of length max_len: pieces, then EOS, then padding (truncated if long)."""
        ids = [self.piece_id(p) for p in self.pieces(text)][: self.max_len - 1] + [EOS_ID]
        out = np.zeros((self.max_len,), np.int32)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if texts else np.zeros((0, self.max_len), np.int32)

    def collisions(self, words: Iterable[str]) -> dict[int, set[str]]:
        """Ids shared by more than one of `words` (for checking a caption grammar)."""
        seen: dict[int, set[str]] = {}
        for w in set(words):
            for p in self.pieces(w):
                seen.setdefault(self.piece_id(p), set()).add(p)
        return {i: ws for i, ws in seen.items() if len(ws) > 1}
