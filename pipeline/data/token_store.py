"""Pre-tokenized sources: each prepared source tokenised once into memory-mapped token stores.

A token store holds one source's token ids under one tokenizer, so training can read ids
instead of encoding text at every draw, and a later window mode can cut the flat token stream
into windows. Layout, beside the token counts in the prepared corpus directory::

    <corpus>/token_stores-<tokenizer_hash[:16]>/
        <source>/
            store.json            # written last: dtype, sizes, hashes, checksums of the files
            <column>.tokens       # every document's ids, concatenated (little-endian uint16
                                  #   when the vocabulary has <= 65,536 ids, else uint32)
            <column>.offsets      # int64, num_documents + 1: document i is tokens[o[i]:o[i+1]]
    <corpus>/token_parts-<tokenizer_hash[:16]>/    # shards in progress; removed on publish
        <source>/<start>-<stop>.<column>.tokens|.lengths

Columns are ``text`` (mono sources, image-text captions) or ``src`` and ``tgt`` (parallel
sources, one document = one side of a pair). Ids are the tokenizer's plain encoding of the
stored text (no bos/eos, no language tag: framing is the reader's choice), so a store's token
total equals :func:`pipeline.data.token_stats.count_tokens` for its source.

Content-addressed: the corpus directory is named by the recipe's content hash and the stores
folder by the tokenizer hash, so (source, tokenizer) -> one store. Each source's store is built
in a temp folder and renamed into place complete (pipeline/storage/atomic.py), with an XXH3
checksum of each file in ``store.json`` (pipeline/storage/integrity.py), verified by
:meth:`TokenStore.open`: a changed byte is an ``IntegrityError`` naming the file.

Work is cut into units of ``shard_documents`` documents of one source (:func:`plan_units`).
Each unit is encoded into part files (:func:`encode_unit`), in this process or in a pool of
processes (``prepare.workers``), or by the tasks of a job array (``prepare.shard`` of
``prepare.num_shards``, each writing its units into the shared cache). Publishing
(:func:`publish_stores`) concatenates the parts of each source in document order, so the
store's bytes do not depend on the number of processes or tasks that wrote the parts.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.data.build_corpus import make_temp_dir, remove_stale_temp_dirs
from pipeline.data.corpus import JSON_FORMAT, SOURCES_DIR, TMP_PREFIX, PreparedCorpus
from pipeline.data.row_reader import open_source_table
from pipeline.storage.atomic import atomic_write, atomic_write_json, publish_dir, reraise_disk_full
from pipeline.storage.integrity import IntegrityError, checksum_files, verify_files

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
META = "store.json"
DEFAULT_SHARD_DOCUMENTS = 65_536  # documents per work unit: small enough to spread one large source
ENCODE_BATCH = 1024  # texts per sentencepiece call
_UINT16_IDS = 1 << 16


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab <= 65,536), else uint32."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > 1 << 32:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")
    return np.dtype("<u2") if vocab_size <= _UINT16_IDS else np.dtype("<u4")


def text_columns(kind: str) -> tuple[str, ...]:
    """The text columns a store keeps for a source kind (same as the token counts)."""
    return ("src", "tgt") if kind == "parallel" else ("text",)


def stores_dir(corpus_path: str | Path, tokenizer_hash: str) -> Path:
    return Path(corpus_path) / f"token_stores-{tokenizer_hash[:16]}"


def parts_dir(corpus_path: str | Path, tokenizer_hash: str) -> Path:
    return Path(corpus_path) / f"token_parts-{tokenizer_hash[:16]}"


# -- reading -----------------------------------------------------------------------------------


class TokenStore:
    """One source's token ids, memory-mapped. Open with :meth:`open`.

    Attributes:
        path: the store directory. source: the source name. columns: its text columns.
        dtype: the id dtype. num_documents: documents (rows) of the source.
        meta: the parsed ``store.json``.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.source = str(meta["source"])
        self.columns = tuple(meta["columns"])
        self.dtype = np.dtype(meta["dtype"])
        self.num_documents = int(meta["num_documents"])
        self.tokenizer_hash = str(meta["tokenizer_hash"])
        self._tokens: dict[str, np.ndarray] = {}
        self._offsets: dict[str, np.ndarray] = {}
        for column in self.columns:
            self._offsets[column] = _map(path / f"{column}.offsets", np.dtype("<i8"), self.num_documents + 1)
            num_tokens = int(meta["num_tokens"][column])
            self._tokens[column] = _map(path / f"{column}.tokens", self.dtype, num_tokens)
            offsets = self._offsets[column]
            if offsets[0] != 0 or offsets[-1] != num_tokens:
                raise IntegrityError(f"token store {path}: {column}.offsets span [{offsets[0]}, {offsets[-1]}], "
                                     f"expected [0, {num_tokens}]")

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> TokenStore:
        """Open a store directory.

        Args:
            verify: check every file against the checksums in ``store.json`` (reads each byte
                once; disk-bound).

        Raises:
            ValueError: the store is missing or its ``store.json`` unreadable or of another format.
            IntegrityError: a file is missing, truncated or changed since it was written (names it).
        """
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise ValueError(f"token store {str(path)!r} has no {META} (missing or never published)")
        try:
            import json

            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"token store metadata {str(meta_path)!r} is unreadable: {err}") from err
        if not isinstance(meta, dict) or meta.get("format_version") != STORE_FORMAT_VERSION:
            raise ValueError(f"token store {str(path)!r} has format "
                             f"{meta.get('format_version') if isinstance(meta, dict) else None!r}, this code "
                             f"reads {STORE_FORMAT_VERSION}; prepare it again")
        if verify:
            verify_files(path, meta.get("checksums"), f"token store of source {meta.get('source')!r}")
        try:
            return cls(path, meta)
        except (KeyError, TypeError) as err:
            raise ValueError(f"token store metadata {str(meta_path)!r} is incomplete: {err!r}") from err

    def __reduce__(self):
        # Pickled (to spawned dataloader workers) as its path and metadata, and mapped again
        # there: pickling the memory maps would copy every token into the message.
        return (TokenStore, (self.path, self.meta))

    def _column(self, column: str | None) -> str:
        if column is None:
            return self.columns[0]
        if column not in self.columns:
            raise ValueError(f"token store of source {self.source!r} has columns {list(self.columns)}, "
                             f"not {column!r}")
        return column

    def __len__(self) -> int:
        return self.num_documents

    def num_tokens(self, column: str | None = None) -> int:
        """Tokens of one column (default: the first, ``text`` or ``src``)."""
        return int(self._tokens[self._column(column)].shape[0])

    @property
    def total_tokens(self) -> int:
        """Tokens over every column (parallel: src + tgt), as the token counts count them."""
        return sum(int(t.shape[0]) for t in self._tokens.values())

    def offsets(self, column: str | None = None) -> np.ndarray:
        """int64 (num_documents + 1,): document i spans ``tokens()[o[i]:o[i + 1]]``."""
        return self._offsets[self._column(column)]

    def tokens(self, column: str | None = None) -> np.ndarray:
        """The flat token stream of a column (memory-mapped, read-only; no copy)."""
        return self._tokens[self._column(column)]

    def document(self, i: int, column: str | None = None) -> np.ndarray:
        """Token ids of document ``i`` (a read-only view into the memory map)."""
        column = self._column(column)
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range for source {self.source!r} "
                             f"({self.num_documents} documents)")
        i %= self.num_documents
        offsets = self._offsets[column]
        return self._tokens[column][offsets[i]:offsets[i + 1]]

    def document_lengths(self, column: str | None = None) -> np.ndarray:
        return np.diff(self.offsets(column))

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, source={self.source!r}, documents={self.num_documents}, "
                f"tokens={self.total_tokens}, dtype={self.dtype.name})")


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    size = path.stat().st_size if path.is_file() else -1
    if size != count * dtype.itemsize:
        raise IntegrityError(f"token store file {path} has {size} bytes, expected {count * dtype.itemsize} "
                             f"({count} x {dtype.name})")
    if count == 0:  # numpy cannot memory-map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_token_stores(corpus: PreparedCorpus, tokenizer_hash: str, verify: bool = True
                      ) -> dict[str, TokenStore] | None:
    """Every source's store of this tokenizer, or None if any source has none yet.

    Raises:
        IntegrityError: a published store's file changed (names the file).
    """
    root = stores_dir(corpus.path, tokenizer_hash)
    if not all((root / name / META).is_file() for name in corpus.source_names):
        return None
    stores = {name: TokenStore.open(root / name, verify=verify) for name in corpus.source_names}
    for name, store in stores.items():
        _check_matches(store, corpus, name, tokenizer_hash)
    return stores


def _check_matches(store: TokenStore, corpus: PreparedCorpus, name: str, tokenizer_hash: str) -> None:
    expected = (name, corpus.content_hash, tokenizer_hash, corpus.num_documents(name))
    found = (store.source, store.meta.get("corpus_hash"), store.tokenizer_hash, store.num_documents)
    if found != expected:
        raise ValueError(f"token store {str(store.path)!r} belongs to (source, corpus, tokenizer, documents) "
                         f"{found}, not {expected}; delete it and prepare again")


# -- work units --------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class WorkUnit:
    """Documents [start, stop) of one source: what one process encodes in one go."""

    source: str
    start: int
    stop: int

    @property
    def stem(self) -> str:
        return f"{self.start:012d}-{self.stop:012d}"


def plan_units(corpus: PreparedCorpus, shard_documents: int = DEFAULT_SHARD_DOCUMENTS,
               sources: Iterable[str] | None = None) -> list[WorkUnit]:
    """Units of at most ``shard_documents`` documents, sources in name order: the same list on
    every process and task, so shard i of n is ``units[i::n]`` everywhere."""
    if isinstance(shard_documents, bool) or not isinstance(shard_documents, int) or shard_documents < 1:
        raise ValueError(f"prepare.shard_documents must be a positive int, got {shard_documents!r}")
    names = corpus.source_names if sources is None else sorted(sources)
    units = []
    for name in names:
        n = corpus.num_documents(name)
        units += [WorkUnit(name, start, min(n, start + shard_documents)) for start in range(0, n, shard_documents)]
    return units


def unit_done(parts: Path, unit: WorkUnit, columns: Sequence[str]) -> bool:
    """Every column's tokens and lengths files are there (each written atomically, the lengths
    last; a publish that moved a tokens file into a store and then failed leaves it undone)."""
    folder = parts / unit.source
    return all((folder / f"{unit.stem}.{c}.{kind}").is_file() for c in columns for kind in ("tokens", "lengths"))


# -- encoding (runs in worker processes) -------------------------------------------------------

_WORKER: dict[str, Any] = {}  # per process: the sentencepiece model and the last source's Arrow table


def _worker_model(model_file: str) -> Any:
    if _WORKER.get("model_file") != model_file:
        import sentencepiece as spm

        _WORKER.update(model_file=model_file, sp=spm.SentencePieceProcessor(model_file=model_file))
    return _WORKER["sp"]


def source_table(source_dir: str | Path) -> Any:
    """A prepared source's memory-mapped ``pyarrow.Table`` (`open_source_table`), kept for the
    next unit of the same source in this worker process."""
    if _WORKER.get("source_dir") != str(source_dir):
        _WORKER.update(source_dir=str(source_dir), table=open_source_table(source_dir))
    return _WORKER["table"]


def encode_unit(source_dir: str, columns: Sequence[str], model_file: str, vocab_size: int, parts: str,
                unit: WorkUnit, threads: int = 1) -> tuple[int, int]:
    """Encode one unit's documents into part files; returns (text bytes read, tokens written).

    The tokens file is streamed batch by batch (memory stays at one batch), then the lengths
    file is written; both atomically, so a unit is either complete or absent.
    """
    sp = _worker_model(model_file)
    dtype = token_dtype(vocab_size)
    table = source_table(source_dir)
    if table.num_rows < unit.stop:
        raise ValueError(f"prepared source {source_dir!r} has {table.num_rows} rows, shard {unit} needs {unit.stop}")
    folder = Path(parts) / unit.source
    num_bytes = num_tokens = 0
    for column in columns:
        lengths: list[np.ndarray] = []
        values = table.column(column)

        def write(stream: IO, values: Any = values, lengths: list = lengths) -> None:
            nonlocal num_bytes, num_tokens
            for start in range(unit.start, unit.stop, ENCODE_BATCH):
                texts = values.slice(start, min(unit.stop, start + ENCODE_BATCH) - start).to_pylist()
                num_bytes += sum(len(t.encode("utf-8")) for t in texts)
                ids = sp.encode(texts, out_type=int, num_threads=threads)
                sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                total = int(sizes.sum())
                flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=total)
                if total and (flat.min() < 0 or flat.max() >= vocab_size):
                    raise ValueError(f"source {unit.source!r}: token id {int(flat.max())} outside the "
                                     f"vocabulary of {vocab_size}")
                stream.write(flat.astype(dtype).tobytes())
                lengths.append(sizes)
                num_tokens += total

        atomic_write(folder / f"{unit.stem}.{column}.tokens", write, binary=True)
        joined = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        atomic_write(folder / f"{unit.stem}.{column}.lengths",
                     lambda stream, joined=joined: stream.write(joined.astype("<i8").tobytes()), binary=True)
    return num_bytes, num_tokens


def _encode_task(args: tuple) -> tuple[int, int]:
    return encode_unit(*args)


def encode_units(corpus: PreparedCorpus, model_file: str | Path, vocab_size: int, tokenizer_hash: str,
                 units: Sequence[WorkUnit], workers: int = 1, progress: bool = True) -> tuple[int, int]:
    """Encode the units whose parts are missing, in ``workers`` processes (1: this process).

    Returns:
        (text bytes, tokens) encoded by this call.
    """
    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"prepare.workers must be a positive int, got {workers!r}")
    parts = parts_dir(corpus.path, tokenizer_hash)
    todo = [u for u in units if not unit_done(parts, u, text_columns(corpus.kind(u.source)))]
    # One sentencepiece thread per process: the processes are the parallelism (measured: two
    # threads in one process were no faster than one on the loaded 2-core machine).
    tasks = [(str(corpus.path / SOURCES_DIR / u.source), text_columns(corpus.kind(u.source)), str(model_file),
              vocab_size, str(parts), u, 1) for u in todo]
    num_bytes = num_tokens = 0
    with reraise_disk_full(parts), tqdm(total=len(tasks), desc="pre-tokenize", unit="shard",
                                        disable=not progress) as bar:
        if workers == 1 or len(tasks) <= 1:
            results: Iterable[tuple[int, int]] = (encode_unit(*t) for t in tasks)
            for b, t in results:
                num_bytes, num_tokens = num_bytes + b, num_tokens + t
                bar.update(1)
            _WORKER.pop("table", None)  # do not keep the last source mapped in this process
            _WORKER.pop("source_dir", None)
        else:
            # spawn, not fork: a forked child would inherit sentencepiece's and arrow's threads.
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=get_context("spawn")) as pool:
                for b, t in pool.map(_encode_task, tasks):
                    num_bytes, num_tokens = num_bytes + b, num_tokens + t
                    bar.update(1)
    return num_bytes, num_tokens


# -- publishing --------------------------------------------------------------------------------


def publish_stores(corpus: PreparedCorpus, tokenizer_hash: str, vocab_size: int,
                   sources: Iterable[str] | None = None,
                   shard_documents: int = DEFAULT_SHARD_DOCUMENTS) -> dict[str, TokenStore]:
    """Concatenate each source's parts into its store, publish it, remove the parts.

    Raises:
        ValueError: a unit's parts are missing (names the first missing units: run the shards
            that own them, or prepare without ``prepare.shard`` to encode them here).
    """
    names = corpus.source_names if sources is None else sorted(sources)
    parts = parts_dir(corpus.path, tokenizer_hash)
    root = stores_dir(corpus.path, tokenizer_hash)
    build = [name for name in names if not (root / name / META).is_file()]
    units = plan_units(corpus, shard_documents, build)
    missing = [u for u in units if not unit_done(parts, u, text_columns(corpus.kind(u.source)))]
    if missing:
        shown = ", ".join(f"{u.source}[{u.start}:{u.stop}]" for u in missing[:5])
        raise ValueError(f"cannot publish the token stores in {root}: {len(missing)} of {len(units)} shards "
                         f"are not encoded yet ({shown}{', ...' if len(missing) > 5 else ''})")
    dtype = token_dtype(vocab_size)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)
    stores = {}
    for name in names:
        target = root / name
        if name not in build:
            stores[name] = TokenStore.open(target, verify=False)
            continue
        own = [u for u in units if u.source == name]
        tmp = make_temp_dir(root, name)
        try:
            with reraise_disk_full(tmp):
                _assemble(corpus, name, own, parts / name, tmp, dtype, tokenizer_hash, vocab_size)
            publish_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stores[name] = TokenStore.open(target, verify=False)  # checksummed from these very files just now
        shutil.rmtree(parts / name, ignore_errors=True)
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    return stores


def _assemble(corpus: PreparedCorpus, name: str, units: list[WorkUnit], parts: Path, out: Path,
              dtype: np.dtype, tokenizer_hash: str, vocab_size: int) -> None:
    columns = text_columns(corpus.kind(name))
    num_tokens = {}
    for column in columns:
        lengths = np.concatenate([np.fromfile(parts / f"{u.stem}.{column}.lengths", dtype="<i8") for u in units])
        if lengths.shape[0] != corpus.num_documents(name):
            raise ValueError(f"source {name!r}: the parts in {parts} hold {lengths.shape[0]} documents, the corpus "
                             f"{corpus.num_documents(name)}")
        offsets = np.zeros(lengths.shape[0] + 1, dtype="<i8")
        np.cumsum(lengths, out=offsets[1:])
        if len(units) == 1:  # the part is the store's file (already fsynced): move, do not copy
            os.replace(parts / f"{units[0].stem}.{column}.tokens", out / f"{column}.tokens")
        else:
            with open(out / f"{column}.tokens", "wb") as stream:
                for u in units:
                    with open(parts / f"{u.stem}.{column}.tokens", "rb") as part:
                        shutil.copyfileobj(part, stream, 8 << 20)
                stream.flush()
                os.fsync(stream.fileno())
        size = (out / f"{column}.tokens").stat().st_size
        if size != int(offsets[-1]) * dtype.itemsize:
            raise ValueError(f"source {name!r}: token parts in {parts} hold {size} bytes, their lengths say "
                             f"{int(offsets[-1]) * dtype.itemsize}")
        atomic_write(out / f"{column}.offsets", lambda s, o=offsets: s.write(o.tobytes()), binary=True)
        num_tokens[column] = int(offsets[-1])
    files = [f"{c}.{kind}" for c in columns for kind in ("tokens", "offsets")]
    meta = {
        "format_version": STORE_FORMAT_VERSION,
        "source": name,
        "kind": corpus.kind(name),
        "columns": list(columns),
        "dtype": dtype.str,
        "vocab_size": vocab_size,
        "num_documents": corpus.num_documents(name),
        "num_tokens": num_tokens,
        "corpus_hash": corpus.content_hash,
        "tokenizer_hash": tokenizer_hash,
        "checksums": checksum_files(out, files),
    }
    # store.json goes last: a store directory with it is complete.
    atomic_write_json(out / META, meta, prefix=TMP_PREFIX + META, **JSON_FORMAT)


# -- the whole step ----------------------------------------------------------------------------


def build_token_stores(corpus: PreparedCorpus, model_file: str | Path, vocab_size: int, tokenizer_hash: str,
                       workers: int = 1, shard_documents: int = DEFAULT_SHARD_DOCUMENTS,
                       shard: int | None = None, num_shards: int | None = None,
                       progress: bool = True) -> dict[str, TokenStore] | None:
    """Build (or load from the cache) every source's token store.

    Args:
        corpus: the prepared corpus.
        model_file, vocab_size, tokenizer_hash: the tokenizer (its ``model_file``,
            ``vocab_size`` and ``content_hash``).
        workers: processes on this machine.
        shard_documents: documents per work unit.
        shard, num_shards: encode only units ``shard::num_shards`` into the shared parts folder
            and return None (one task of a job array); a later call without them publishes.

    Returns:
        {source: TokenStore}, or None for a shard task.
    """
    if (shard is None) != (num_shards is None):
        raise ValueError(f"set both prepare.shard and prepare.num_shards or neither (got shard={shard!r}, "
                         f"num_shards={num_shards!r})")
    root = stores_dir(corpus.path, tokenizer_hash)
    todo = []
    for name in corpus.source_names:
        path = root / name
        if not (path / META).is_file():
            todo.append(name)
            continue
        try:
            _check_matches(TokenStore.open(path), corpus, name, tokenizer_hash)
        except ValueError as err:  # IntegrityError included: rebuild from the Arrow source
            log.warning("token store %s is invalid (%s); rebuilding it", path, err)
            shutil.rmtree(path)
            todo.append(name)
    units = plan_units(corpus, shard_documents, todo)
    if shard is not None:
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"prepare.num_shards must be a positive int, got {num_shards!r}")
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
            raise ValueError(f"prepare.shard must be an int in [0, {num_shards}), got {shard!r}")
        mine = units[shard::num_shards]
        began = time.perf_counter()
        num_bytes, num_tokens = encode_units(corpus, model_file, vocab_size, tokenizer_hash, mine, workers, progress)
        log.info("pre-tokenize shard %d of %d: %d of %d units, %.1f MB of text, %d tokens in %.1f s; publish with "
                 "a run without prepare.shard once every shard is done", shard, num_shards, len(mine), len(units),
                 num_bytes / 1e6, num_tokens, time.perf_counter() - began)
        return None
    parts = parts_dir(corpus.path, tokenizer_hash)
    pending = [u for u in units if not unit_done(parts, u, text_columns(corpus.kind(u.source)))]
    began = time.perf_counter()
    if pending:
        num_bytes, num_tokens = encode_units(corpus, model_file, vocab_size, tokenizer_hash, pending, workers,
                                             progress)
    stores = publish_stores(corpus, tokenizer_hash, vocab_size, shard_documents=shard_documents)
    if units and len(pending) < len(units):
        log.info("token stores: published %d source(s) from %d shard(s) encoded earlier (a job array) and %d "
                 "encoded now", len(todo), len(units) - len(pending), len(pending))
    elif units:
        seconds = max(time.perf_counter() - began, 1e-9)
        log.info("pre-tokenized %d source(s) in %d process(es): %.1f MB of text, %d tokens in %.1f s "
                 "(%.2f MB/s, %.2fM tokens/s, publishing included)", len(todo), workers, num_bytes / 1e6,
                 num_tokens, seconds, num_bytes / 1e6 / seconds, num_tokens / 1e6 / seconds)
    else:
        log.info("token stores: cache hit %s", root)
    return stores
