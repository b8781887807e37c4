"""Train a SentencePiece tokenizer on a temperature-sampled sample of a prepared corpus.

Training follows mT5: source i is drawn with probability proportional to ``n_i ** (1 / T)``
(``n_i`` in documents; default ``T = 3.33``, i.e. alpha = 0.3), so the long tail gets more
vocabulary than its raw share; ``sample_sentences`` sentences are drawn with a seeded numpy RNG
(both sides of a parallel pair count as sentences). The trained model goes to the cache layout
of :mod:`pipeline.data.tokenizer`, published atomically.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.data.build_corpus import make_temp_dir, remove_stale_temp_dirs
from pipeline.data.corpus import JSON_FORMAT, TMP_PREFIX, PreparedCorpus
from pipeline.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    META_FILE,
    MODEL_FILE,
    PAD_ID,
    TOKENIZER_FORMAT_VERSION,
    UNK_ID,
    Tokenizer,
    TokenizerConfig,
    lang_tag,
    tokenizer_hash,
)
from pipeline.mixing.temperature import temperature_probs
from pipeline.storage.atomic import atomic_write_json, discard_dir, publish_dir

log = logging.getLogger(__name__)


def sampling_probs(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """p_i ~ n_i^(1/T) over the sources with n_i > 0, in sorted-name order (mT5's sampling)."""
    names = sorted(n for n, v in sizes.items() if v > 0)
    if not names:
        raise ValueError("cannot sample from a corpus whose sources are all empty")
    probs = temperature_probs(np.array([sizes[n] for n in names], dtype=np.float64), temperature)
    return dict(zip(names, probs.tolist(), strict=True))


def sample_sentences(corpus: PreparedCorpus, config: TokenizerConfig) -> list[str]:
    """Temperature-sampled training sentences (both sides of parallel pairs)."""
    probs = sampling_probs(corpus.sizes("documents"), config.temperature)
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
    # Newlines would split a document into several training sentences; documents longer than
    # sentencepiece's limit would be skipped whole (a corpus of long documents trained nothing).
    return [piece for i in order for piece in split_long(out[i].replace("\n", " "), config.max_sentence_length)]


def split_long(text: str, max_bytes: int) -> list[str]:
    """`text` in pieces of at most `max_bytes` UTF-8 bytes, cut at the last space that fits (or
    between characters when a piece has none); `[text]` when it fits already."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text]
    pieces, start = [], 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        if end < len(data):
            space = data.rfind(b" ", start, end + 1)
            if space > start:
                end = space
            else:
                while end > start and data[end] & 0xC0 == 0x80:  # a continuation byte: mid-character
                    end -= 1
                while end == start or (end < len(data) and data[end] & 0xC0 == 0x80):
                    end += 1  # a limit below one character: that character alone
        pieces.append(data[start:end].decode("utf-8").strip())
        start = end
    return [piece for piece in pieces if piece]


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
        atomic_write_json(
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
            prefix=TMP_PREFIX + META_FILE,
            **JSON_FORMAT,
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
