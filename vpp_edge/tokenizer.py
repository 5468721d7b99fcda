"""Instruction tokenizer on the ``tokenizers`` library alone (no transformers, no torch).

The robot computer tokenizes with exactly this code, so training, export and the runtime
agree on token ids. CLIP folders carry a ``tokenizer.json`` that loads here directly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from vpp_edge.errors import CheckpointError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class InstructionTruncatedWarning(UserWarning):
    """An instruction is longer than the video model's text condition and is truncated there."""


class InstructionTokenizer:
    """Fixed-length CLIP-style tokenization: BOS + text + EOS, padded with EOS.

    ``max_length`` is the number of ids handed to the text stage (the action head's goal
    pass, 77 as OpenAI CLIP's context; longer instructions are refused, as the official
    ``clip.tokenize`` does). ``condition_length`` is the video model's text condition (20):
    the text stage truncates to it as the official transformers tokenizer does, and this
    tokenizer warns, naming the token count, when an instruction does not fit. With
    ``condition_length == max_length`` (artifacts made before the goal had its own pass)
    an over-long instruction is truncated here instead, keeping its end-of-text token.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, condition_length: int | None = None):
        eos_id = tokenizer.token_to_id(EOS)
        if eos_id is None:
            raise CheckpointError(f"tokenizer has no '{EOS}' token; is it a CLIP tokenizer?")
        self.eos_id = eos_id
        self.max_length = max_length
        self.condition_length = max_length if condition_length is None else condition_length
        if not 2 <= self.condition_length <= max_length:
            raise ValueError(f"condition_length {self.condition_length} must be in [2, max_length {max_length}]")
        self._tok = tokenizer
        self._configure()

    def _configure(self) -> None:
        # Truncation and padding are done in __call__, where the token count is known.
        self._tok.no_truncation()
        self._tok.no_padding()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both int64 [B, max_length].

        Raises ``ValueError`` for an instruction of more than ``max_length`` tokens; warns
        (:class:`InstructionTruncatedWarning`) for one of more than ``condition_length``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("instructions must be a non-empty list of strings")
        ids = np.full((len(texts), self.max_length), self.eos_id, dtype=np.int64)
        mask = np.zeros((len(texts), self.max_length), dtype=np.int64)
        for row, (text, enc) in enumerate(zip(texts, self._tok.encode_batch(texts))):
            tokens = enc.ids
            count = len(tokens)
            if count > self.condition_length:
                if self.condition_length < self.max_length < count:
                    raise ValueError(f"instruction of {count} tokens (with start and end) is too long for the "
                                     f"{self.max_length}-token CLIP context: {text!r}")
                goal = f"all {count}" if count <= self.max_length else f"the first {self.max_length}"
                warnings.warn(f"instruction of {count} tokens (with start and end) is truncated to "
                              f"{self.condition_length} for the video model's text condition, as the official "
                              f"code does; the action head's goal uses {goal} tokens: {text!r}",
                              InstructionTruncatedWarning, stacklevel=2)
                tokens = tokens[:self.max_length - 1] + [self.eos_id] if count > self.max_length else tokens
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        self._tok.save(str(path))  # no padding or truncation is configured (see _configure)
        return path


def load_tokenizer(folder: str | Path, max_length: int, condition_length: int | None = None) -> InstructionTokenizer:
    """Load ``<folder>/tokenizer.json`` (a CLIP folder or one of our checkpoints)."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file missing (a CLIP folder must contain {TOKENIZER_FILE})")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception on bad JSON
        raise CheckpointError(f"{path}: cannot read tokenizer ({exc})") from None
    return InstructionTokenizer(tok, max_length, condition_length)


def byte_level_tokenizer(max_length: int, condition_length: int | None = None) -> InstructionTokenizer:
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
    return InstructionTokenizer(tok, max_length, condition_length)
