"""Batched row reads across many prepared sources, opened lazily and cheaply.

Reading a micro-batch source by source through `datasets` costs one `Dataset.__getitem__`
per source (~100 us each), and opening 100+ sources with `datasets.load_from_disk` costs
~2 ms each. Here a source's Arrow files (listed in its ``state.json``, in the order
`datasets` reads them) are memory-mapped with pyarrow directly, only when a row of that
source is first read, and a micro-batch is one zero-copy slice per row. Rows
and values are those `datasets` gives (the prepared columns are strings, bytes and int8
sequences, which both turn into the same Python values).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.corpus import SOURCES_DIR


def open_source_table(source_dir: str | Path) -> Any:
    """A prepared source's rows as one memory-mapped ``pyarrow.Table`` (no copy), from the
    Arrow stream files its ``state.json`` lists, in that order (`datasets`' row order).

    Raises:
        ValueError: naming the source folder, when ``state.json`` or a file is unreadable.
    """
    import pyarrow as pa

    source_dir = Path(source_dir)
    state_path = source_dir / "state.json"
    try:
        files = json.loads(state_path.read_text(encoding="utf-8"))["_data_files"]
        tables = []
        for entry in files:
            with pa.memory_map(str(source_dir / entry["filename"]), "r") as mapped:
                tables.append(pa.ipc.open_stream(mapped).read_all())
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid) as err:
        raise ValueError(f"prepared source {str(source_dir)!r} is unreadable ({state_path} and its Arrow "
                         f"files): {err}") from err
    if not tables:
        raise ValueError(f"prepared source {str(source_dir)!r} lists no Arrow files in {state_path}")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class RowReader:
    """Args:
        corpus: a `PreparedCorpus` (its ``path`` holds ``sources/<name>/``).
        sources: source names; `read` takes indices into this list.
    """

    def __init__(self, corpus, sources: Sequence[str]):
        self.corpus = corpus
        self.sources = list(sources)
        self.kinds = [corpus.kind(name) for name in self.sources]
        self.sizes = np.array([corpus.num_documents(name) for name in self.sources], dtype=np.int64)
        self._tables: dict[int, Any] = {}  # source index -> its table, opened on first read

    def _table(self, source_id: int):
        """Source `source_id`'s memory-mapped table, opened (and checked) on first use."""
        if source_id not in self._tables:
            name = self.sources[source_id]
            table = open_source_table(Path(self.corpus.path) / SOURCES_DIR / name)
            if table.num_rows != int(self.sizes[source_id]):
                raise ValueError(f"source {name!r} has {table.num_rows} rows but the manifest says "
                                 f"num_documents={int(self.sizes[source_id])}")
            self._tables[source_id] = table
        return self._tables[source_id]

    def read_columns(self, source_ids: np.ndarray, rows: np.ndarray) -> dict[str, list[Any]]:
        """{column: values in input order} for (source_ids (K,), rows (K,)); all rows must be
        of one kind (one schema)."""
        source_ids = np.asarray(source_ids, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        self._check(source_ids, rows)
        # (a set, not np.unique: its first call imports a numpy submodule, ~0.3 s of a restart)
        kinds = {self.kinds[i] for i in set(source_ids.tolist())}
        if len(kinds) > 1:
            raise ValueError(f"read_columns needs rows of one kind, got {sorted(kinds)}")
        if not len(rows):
            return {}
        # One zero-copy single-row slice per row, in input order, as `datasets` gathers
        # rows: no Arrow compute kernel (a take's first call loads them, ~0.1 s) and no
        # numpy -> Arrow conversion (`pyarrow.array` of a numpy array imports pandas, ~1 s).
        import pyarrow as pa

        parts = [self._table(source).slice(row, 1) for source, row in zip(source_ids.tolist(), rows.tolist(),
                                                                           strict=True)]
        return pa.concat_tables(parts).to_pydict()

    def read(self, source_ids: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """Rows (dicts of column values) for (source_ids (K,), rows (K,)), in input order."""
        source_ids = np.asarray(source_ids, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        self._check(source_ids, rows)
        out: list[dict[str, Any] | None] = [None] * len(rows)
        kinds = np.array(self.kinds, dtype=object)[source_ids] if len(rows) else np.array([])
        for kind in set(kinds.tolist()):
            positions = np.flatnonzero(kinds == kind)
            columns = self.read_columns(source_ids[positions], rows[positions])
            for j, position in enumerate(positions.tolist()):
                out[position] = {name: values[j] for name, values in columns.items()}
        return out  # type: ignore[return-value]

    def _check(self, source_ids: np.ndarray, rows: np.ndarray) -> None:
        if rows.size and ((rows < 0).any() or (rows >= self.sizes[source_ids]).any()):
            bad = int(np.flatnonzero((rows < 0) | (rows >= self.sizes[source_ids]))[0])
            name = self.sources[int(source_ids[bad])]
            raise ValueError(f"row {int(rows[bad])} out of range for source {name!r} "
                             f"({int(self.sizes[source_ids[bad]])} rows)")

    def __getstate__(self):  # tables re-open lazily in dataloader workers
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state
