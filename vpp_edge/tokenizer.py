"""Instruction tokenizer on the ``tokenizers`` library alone (no transformers, no torch).

The robot computer tokenizes with exactly this code, so training, export and the runtime
agree on token ids. CLIP folders carry a ``tokenizer.json`` that loads here directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from vpp_edge.errors import CheckpointError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class InstructionTokenizer:
    """Fixed-length CLIP-style tokenization: BOS + text + EOS, padded with EOS, truncated."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        eos_id = tokenizer.token_to_id(EOS)
        if eos_id is None:
            raise CheckpointError(f"tokenizer has no '{EOS}' token; is it a CLIP tokenizer?")
        self.eos_id = eos_id
        self.max_length = max_length
        self._tok = tokenizer
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(length=max_length, pad_id=eos_id, pad_token=EOS)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both int64 [B, max_length]."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("instructions must be a non-empty list of strings")
        enc = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        self._tok.no_padding()
        self._tok.no_truncation()
        try:
            self._tok.save(str(path))
        finally:
            self._tok.enable_truncation(max_length=self.max_length)
            self._tok.enable_padding(length=self.max_length, pad_id=self.eos_id, pad_token=EOS)
        return path


def load_tokenizer(folder: str | Path, max_length: int) -> InstructionTokenizer:
    """Load ``<folder>/tokenizer.json`` (a CLIP folder or one of our checkpoints)."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file missing (a CLIP folder must contain {TOKENIZER_FILE})")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception on bad JSON
        raise CheckpointError(f"{path}: cannot read tokenizer ({exc})") from None
    return InstructionTokenizer(tok, max_length)


def byte_level_tokenizer(max_length: int) -> InstructionTokenizer:
    """A CLIP-like byte-level tokenizer with 258 ids (256 bytes + BOS + EOS).

    For tiny models built without a CLIP download: deterministic, offline, and saved into
    their checkpoints like any other tokenizer. EOS is the highest id, as in CLIP.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return InstructionTokenizer(tok, max_length)
