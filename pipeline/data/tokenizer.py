"""SentencePiece tokenizer trained on a temperature-sampled sample of a prepared corpus.

Training follows mT5: source i is drawn with probability proportional to ``n_i ** (1 / T)``
(``n_i`` in documents; default ``T = 3.33``, i.e. alpha = 0.3), so the long tail gets more
vocabulary than its raw share; ``sample_sentences`` sentences are drawn with a seeded numpy RNG
(both sides of a parallel pair count as sentences). Every language in the corpus gets a
reserved piece ``<2xxx>`` (a user-defined symbol, never split). Special ids are fixed:
pad=0, unk=1, bos=2, eos=3. ``byte_fallback`` keeps unseen characters (emoji) out of ``<unk>``.

Cache layout::

    <cache_dir>/tokenizers/<hash[:16]>/spm.model
    <cache_dir>/tokenizers/<hash[:16]>/tokenizer.json   # config, corpus hash, languages

where ``hash`` covers the corpus content hash, the config and the sentencepiece version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.corpus import (
    TMP_PREFIX,
    PreparedCorpus,
    canonical_json,
    make_temp_dir,
    remove_stale_temp_dirs,
    write_json_atomic,
)
from pipeline.storage.atomic import discard_dir, publish_dir

log = logging.getLogger(__name__)

TOKENIZER_FORMAT_VERSION = 1
MODEL_FILE = "spm.model"
META_FILE = "tokenizer.json"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe", "char", "word")
ENCODE_BATCH = 1024


@dataclass
class TokenizerConfig:
    """Options of :func:`train_tokenizer` (``conf/tokenizer/*.yaml``).

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
        if not float(self.temperature) > 0:
            raise ValueError(f"tokenizer.temperature must be > 0, got {self.temperature!r}")
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

    Use :func:`train_tokenizer` or :meth:`load`; ids never include bos/eos unless you add them.
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


# -- training ------------------------------------------------------------------------------
def temperature_probs(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """p_i ~ n_i^(1/T), over sources with n_i > 0, in sorted-name order."""
    names = sorted(n for n, v in sizes.items() if v > 0)
    if not names:
        raise ValueError("cannot sample from a corpus whose sources are all empty")
    weights = np.array([sizes[n] for n in names], dtype=np.float64) ** (1.0 / float(temperature))
    weights /= weights.sum()
    return dict(zip(names, weights.tolist(), strict=True))


def sample_sentences(corpus: PreparedCorpus, config: TokenizerConfig) -> list[str]:
    """Temperature-sampled training sentences (both sides of parallel pairs)."""
    probs = temperature_probs(corpus.sizes("documents"), config.temperature)
    names = list(probs)
    rng = np.random.default_rng(config.seed)
    picks = rng.choice(len(names), size=config.sample_sentences, p=list(probs.values()))
    counts = np.bincount(picks, minlength=len(names))
    out: list[str] = []
    for name, k in zip(names, counts.tolist(), strict=True):
        if k == 0:
            continue
        ds = corpus.dataset(name)
        idx = np.sort(rng.integers(0, len(ds), size=k)).tolist()
        rows = ds[idx]
        columns = ("src", "tgt") if corpus.kind(name) == "parallel" else ("text",)
        for column in columns:
            out.extend(rows[column])
    # Interleave sources so sentencepiece's own sentence limit (if any) sees a fair mix.
    order = rng.permutation(len(out))
    # Newlines would split a document into several training sentences.
    return [out[i].replace("\n", " ") for i in order]


def _train_model(sentences: list[str], languages: list[str], config: TokenizerConfig) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    kwargs = dict(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        character_coverage=config.character_coverage,
        byte_fallback=config.byte_fallback,
        user_defined_symbols=[lang_tag(lang) for lang in languages],
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=config.num_threads,
        max_sentence_length=config.max_sentence_length,
        input_sentence_size=0,  # use every sampled sentence; the sample is already the budget
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(config.seed)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as err:
        msg = str(err)
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise ValueError(
                f"tokenizer.vocab_size={config.vocab_size} does not fit this corpus "
                f"({len(sentences)} sampled sentences, {len(languages)} language tags): {msg.strip()} "
                f"{vocab_size_hint(msg, config)}"
            ) from err
        raise ValueError(f"SentencePiece training failed: {msg.strip()}") from err
    return model.getvalue()


def vocab_size_hint(message: str, config: TokenizerConfig) -> str:
    """What to change, from SentencePiece's vocabulary-size error (too high or too small)."""
    high = re.search(r"too high.*?<=\s*(\d+)", message, re.S)
    if high:
        return (f"Lower tokenizer.vocab_size to <= {high.group(1)}, or give the tokenizer more text "
                f"(raise tokenizer.sample_sentences, now {config.sample_sentences}, or add documents).")
    small = re.search(r"smaller than required_chars\.\s*(\d+)\s*vs\.?\s*(\d+)", message)
    if small:
        return (f"Raise tokenizer.vocab_size to >= {small.group(2)} (the characters and special pieces it must hold), or lower "
                f"tokenizer.character_coverage (now {config.character_coverage}).")
    if "smaller" in message or "too small" in message:
        return "Raise tokenizer.vocab_size, or lower tokenizer.character_coverage."
    return "Change tokenizer.vocab_size (see SentencePiece's message above for the bound)."


def train_tokenizer(
    corpus: PreparedCorpus,
    config: TokenizerConfig | None = None,
    cache_dir: str | Path = ".cache/mixpipe",
) -> Tokenizer:
    """Train (or load from cache) a tokenizer for ``corpus``.

    Returns:
        The :class:`Tokenizer` from ``<cache_dir>/tokenizers/<hash[:16]>/``.

    Raises:
        ValueError: bad config, or a vocab size the sample cannot fill.
    """
    config = config or TokenizerConfig()
    digest = tokenizer_hash(corpus.content_hash, config)
    root = Path(cache_dir) / "tokenizers"
    target = root / digest[:16]
    if target.exists():
        try:
            tok = Tokenizer.load(target)
            if tok.content_hash == digest:
                log.info("tokenizer: cache hit %s", target)
                return tok
            log.warning(
                "tokenizer at %s has hash %s, expected %s; retraining",
                target,
                tok.content_hash[:16],
                digest[:16],
            )
        except ValueError as err:
            log.warning("tokenizer at %s is invalid (%s); retraining", target, err)
        discard_dir(target, TMP_PREFIX)
    languages = corpus.languages()
    start = time.perf_counter()
    sentences = sample_sentences(corpus, config)
    model = _train_model(sentences, languages, config)
    seconds = time.perf_counter() - start
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)
    tmp = make_temp_dir(root, digest[:16])
    try:
        (tmp / MODEL_FILE).write_bytes(model)
        write_json_atomic(
            tmp / META_FILE,
            {
                "content_hash": digest,
                "corpus_hash": corpus.content_hash,
                "config": dataclasses.asdict(config),
                "languages": languages,
                "num_sampled_sentences": len(sentences),
                "train_seconds": round(seconds, 3),
                "format_version": TOKENIZER_FORMAT_VERSION,
            },
        )
        publish_dir(tmp, target)  # another process may have trained the same tokenizer first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "tokenizer: trained %s (%d sentences, %d language tags) in %.1fs",
        target,
        len(sentences),
        len(languages),
        seconds,
    )
    return Tokenizer.load(target)


# -- counting ------------------------------------------------------------------------------
def _text_batches(
    corpus: PreparedCorpus, name: str, indices: list[int] | None = None
) -> Iterator[list[str]]:
    ds = corpus.dataset(name)
    columns = ("src", "tgt") if corpus.kind(name) == "parallel" else ("text",)
    if indices is None:
        for batch in ds.iter(batch_size=ENCODE_BATCH):
            for column in columns:
                yield batch[column]
    else:
        for start in range(0, len(indices), ENCODE_BATCH):
            rows = ds[indices[start : start + ENCODE_BATCH]]
            for column in columns:
                yield rows[column]


def count_tokens(
    corpus: PreparedCorpus, tokenizer: Tokenizer, progress: bool = True
) -> dict[str, int]:
    """Total tokens per source (no bos/eos); parallel sources count src + tgt."""
    from tqdm.auto import tqdm

    counts: dict[str, int] = {}
    names = corpus.source_names
    for name in tqdm(names, desc="count tokens", unit="source", disable=not progress):
        counts[name] = sum(
            len(ids) for texts in _text_batches(corpus, name) for ids in tokenizer.encode(texts)
        )
    return counts


def fertility(
    corpus: PreparedCorpus, tokenizer: Tokenizer, max_documents: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Tokens per character per source, over the whole source or a seeded sample of docs."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for name in corpus.source_names:
        n = corpus.num_documents(name)
        indices = (
            None
            if n <= max_documents
            else np.sort(rng.choice(n, max_documents, replace=False)).tolist()
        )
        tokens = chars = 0
        for texts in _text_batches(corpus, name, indices):
            tokens += sum(len(ids) for ids in tokenizer.encode(texts))
            chars += sum(len(t) for t in texts)
        out[name] = tokens / chars if chars else float("nan")
    return out
