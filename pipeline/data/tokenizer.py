"""SentencePiece tokenizer at run time: config, cache key, and the loaded model with language tags.

Every language in the corpus gets a reserved piece ``<2xxx>`` (a user-defined symbol, never
split). Special ids are fixed: pad=0, unk=1, bos=2, eos=3. ``byte_fallback`` keeps unseen
characters (emoji) out of ``<unk>``. Training lives in :mod:`pipeline.data.train_tokenizer`,
token counts and fertility in :mod:`pipeline.data.token_stats`.

Cache layout::

    <cache_dir>/tokenizers/<hash[:16]>/spm.model
    <cache_dir>/tokenizers/<hash[:16]>/tokenizer.json   # config, corpus hash, languages

where ``hash`` covers the corpus content hash, the config and the sentencepiece version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.corpus import canonical_json

TOKENIZER_FORMAT_VERSION = 1
MODEL_FILE = "spm.model"
META_FILE = "tokenizer.json"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe", "char", "word")


@dataclass
class TokenizerConfig:
    """Options of :func:`pipeline.data.train_tokenizer.train_tokenizer` (``conf/tokenizer/*.yaml``).

    Attributes:
        vocab_size: total pieces including specials, byte pieces and language tags.
        character_coverage: share of characters covered by the model's own pieces.
        model_type: ``unigram`` (default), ``bpe``, ``char`` or ``word``.
        byte_fallback: encode unknown characters as UTF-8 byte pieces instead of ``<unk>``.
        temperature: T in p_i ~ n_i^(1/T) over sources for the training sample.
        sample_sentences: sentences drawn for training.
        seed: numpy seed for the sample and sentencepiece's own seed.
        num_threads: sentencepiece training threads.
        max_sentence_length: longer sentences (bytes) are skipped by sentencepiece.
    """

    vocab_size: int = 8000
    character_coverage: float = 0.9995
    model_type: str = "unigram"
    byte_fallback: bool = True
    temperature: float = 3.33
    sample_sentences: int = 50_000
    seed: int = 0
    num_threads: int = 2
    max_sentence_length: int = 4192

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 16:
            raise ValueError(f"tokenizer.vocab_size must be an int >= 16, got {self.vocab_size!r}")
        if not 0.0 < float(self.character_coverage) <= 1.0:
            raise ValueError(
                f"tokenizer.character_coverage must be in (0, 1], got {self.character_coverage!r}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"tokenizer.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}"
            )
        if not float(self.temperature) > 0 or math.isinf(float(self.temperature)):
            raise ValueError(f"tokenizer.temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.sample_sentences, int) or self.sample_sentences < 1:
            raise ValueError(
                f"tokenizer.sample_sentences must be a positive int, got {self.sample_sentences!r}"
            )
        if not isinstance(self.num_threads, int) or self.num_threads < 1:
            raise ValueError(
                f"tokenizer.num_threads must be a positive int, got {self.num_threads!r}"
            )


def lang_tag(lang: str) -> str:
    """The reserved piece for a language: ``<2deu>``."""
    return f"<2{lang}>"


def tokenizer_hash(corpus_hash: str, config: TokenizerConfig) -> str:
    """Cache key of a tokenizer: corpus content, config, sentencepiece version, format."""
    import sentencepiece

    cfg = dataclasses.asdict(config)
    # num_threads stays in the key: sentencepiece does not promise identical models across
    # thread counts, and a cache must never hand back a model its config would not produce.
    payload = {
        "corpus": corpus_hash,
        "config": cfg,
        "sentencepiece": sentencepiece.__version__,
        "format_version": TOKENIZER_FORMAT_VERSION,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


class Tokenizer:
    """A trained SentencePiece model with language tags.

    Use :func:`pipeline.data.train_tokenizer.train_tokenizer` or :meth:`load`; ids never include
    bos/eos unless you add them.
    """

    def __init__(self, path: Path, content_hash: str, languages: list[str], meta: dict[str, Any]):
        import sentencepiece as spm

        self.path = path
        self.content_hash = content_hash
        self.languages = sorted(languages)
        self.meta = meta
        model_file = path / MODEL_FILE if path.is_dir() else path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"cannot load SentencePiece model {str(model_file)!r}: {err}") from err
        self.model_file = model_file
        self._tag_ids = {}
        for lang in self.languages:
            piece_id = self._sp.piece_to_id(lang_tag(lang))
            if piece_id == self._sp.unk_id():
                raise ValueError(
                    f"tokenizer {str(model_file)!r} lacks language tag {lang_tag(lang)!r}"
                )
            self._tag_ids[lang] = piece_id

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer directory (``spm.model`` + ``tokenizer.json``) or a bare model file.

        A bare model's hash is the sha256 of its bytes and its languages are read from the
        ``<2xxx>`` pieces.
        """
        path = Path(path)
        if path.is_dir():
            meta_path = path / META_FILE
            if not (path / MODEL_FILE).is_file():
                raise ValueError(f"tokenizer directory {str(path)!r} has no {MODEL_FILE}")
            try:
                meta = _load_json(meta_path)
                return cls(path, meta["content_hash"], meta["languages"], meta)
            except (KeyError, TypeError) as err:
                raise ValueError(
                    f"tokenizer metadata {str(meta_path)!r} is incomplete: {err}"
                ) from err
        if not path.is_file():
            raise ValueError(f"tokenizer {str(path)!r} does not exist")
        import sentencepiece as spm

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"cannot load SentencePiece model {str(path)!r}: {err}") from err
        langs = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or not (piece.startswith("<2") and piece.endswith(">")):
                continue
            langs.append(piece[2:-1])
        return cls(path, digest, langs, {"content_hash": digest, "languages": langs})

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def lang_tag(self, lang: str) -> str:
        """``<2xxx>`` for a language of this tokenizer; ValueError otherwise."""
        self.lang_tag_id(lang)
        return lang_tag(lang)

    def lang_tag_id(self, lang: str) -> int:
        try:
            return self._tag_ids[lang]
        except KeyError:
            raise ValueError(
                f"language {lang!r} has no tag in tokenizer {str(self.path)!r}; "
                f"known: {self.languages}"
            ) from None

    # -- text ----------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Encode a batch of texts to ids (no bos/eos)."""
        if isinstance(texts, str):
            raise ValueError(
                "Tokenizer.encode takes a list of strings; wrap a single text in [...]"
            )
        return self._sp.encode(list(texts), out_type=int, num_threads=2)

    def encode_pieces(self, texts: list[str]) -> list[list[str]]:
        if isinstance(texts, str):
            raise ValueError("Tokenizer.encode_pieces takes a list of strings")
        return self._sp.encode(list(texts), out_type=str)

    def decode(self, ids: list[int] | list[list[int]]) -> str | list[str]:
        """Decode one id list to a string, or a batch of id lists to a list of strings."""
        return self._sp.decode(ids)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"languages={len(self.languages)})"
        )


def _load_json(path: Path) -> dict[str, Any]:
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"tokenizer metadata {str(path)!r} is missing or unreadable: {err}"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer metadata {str(path)!r} is not a JSON object")
    return data
