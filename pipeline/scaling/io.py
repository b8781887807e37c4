"""Results tables to law inputs: column selection, derived tokens, validation.

A table is one row per measurement (a run, or a (run, source) pair for per-source losses).
Which column plays which role is given explicitly (the CLI's ``--n-col`` etc.); nothing is
guessed from names. Every problem raises ``ValueError`` naming the table, the column, the row
and the value: a missing column, a non-numeric or missing value, N, D, C or x <= 0,
a loss that is NaN or <= 0, too few rows for the law.

Roles per law:
    power         x_col, loss_col
    chinchilla    n_col and (d_col or c_col, D = C / (k N), k = 6), loss_col
    multilingual  n_col, w_col (mixture weight of the row's source), source_col, loss_col
    mixing        mixture_cols (proportions of each training domain), loss_col (one target)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.scaling.laws import ChinchillaLaw, MixingLaw, MultilingualLaw, PowerLaw, ScalingLaw

__all__ = ["LAWS", "Table", "read_tables", "table_from_frame"]

LAWS = ("power", "chinchilla", "multilingual", "mixing")


@dataclass
class Table:
    """Validated law inputs.

    Attributes:
        law: the law to fit, built for this table (sources / domains filled in).
        X: inputs ``(n, len(law.input_names))``.
        y: losses ``(n,)``.
        columns: role -> column name used (``{"N": "params", "loss": "val_loss", ...}``).
        name: where the table came from (for messages).
    """

    law: ScalingLaw
    X: np.ndarray
    y: np.ndarray
    columns: dict[str, str | list[str]] = field(default_factory=dict)
    name: str = "table"


def read_tables(paths: Sequence[str | Path], on: str | None = None) -> pd.DataFrame:
    """Read one CSV, or several joined (inner) on column ``on`` (e.g. mixtures + losses)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no CSV given")
    frames = []
    for p in paths:
        if not p.is_file():
            raise ValueError(f"CSV not found: {p}")
        frames.append(pd.read_csv(p))
    if len(frames) == 1:
        return frames[0]
    if on is None:
        raise ValueError("several CSVs need a join column (--on)")
    out = frames[0]
    for p, f in zip(paths[1:], frames[1:], strict=True):
        for name, fr in ((paths[0], out), (p, f)):
            if on not in fr.columns:
                raise ValueError(
                    f"{name}: join column {on!r} not found; available: {list(fr.columns)}"
                )
        out = out.merge(f, on=on, how="inner", suffixes=("", f"@{p.stem}"))
    return out


def _numeric(
    df: pd.DataFrame, col: str, flag: str, name: str, positive: bool, role: str
) -> np.ndarray:
    if col not in df.columns:
        raise ValueError(
            f"{name}: column {col!r} ({flag}) not found; available columns: {list(df.columns)}"
        )
    raw = df[col]
    vals = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(vals) & raw.notna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}: column {col!r} ({role}) row {i} has non-numeric value {raw.iloc[i]!r}"
        )
    missing = ~np.isfinite(vals)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(
            f"{name}: column {col!r} ({role}) has {len(rows)} NaN/missing/infinite value(s), "
            f"first at row {int(rows[0])} (value {raw.iloc[int(rows[0])]!r}); drop or fix those rows"
        )
    if positive:
        bad = vals <= 0
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{name}: column {col!r} ({role}) must be > 0, row {i} has {float(vals[i])!r}"
            )
    return vals


def _need(value, flag: str, law: str):
    if not value:
        raise ValueError(f"the {law} law needs {flag}")
    return value


def table_from_frame(
    df: pd.DataFrame,
    *,
    law: str,
    loss_col: str = "loss",
    n_col: str | None = None,
    d_col: str | None = None,
    c_col: str | None = None,
    x_col: str | None = None,
    w_col: str | None = None,
    source_col: str | None = None,
    mixture_cols: Sequence[str] | None = None,
    flops_per_param_token: float = 6.0,
    name: str = "table",
) -> Table:
    """Select and validate the columns ``law`` needs; build the law (see module docstring).

    Raises:
        ValueError: unknown law, missing flag or column, bad values, too few rows.
    """
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; choose one of {LAWS}")
    if len(df) == 0:
        raise ValueError(f"{name}: table has no rows")
    y = _numeric(df, loss_col, "--loss-col", name, positive=True, role="loss")
    cols: dict[str, str | list[str]] = {"loss": loss_col}
    if law == "power":
        x_col = _need(x_col, "--x-col", law)
        X = _numeric(df, x_col, "--x-col", name, True, "x")[:, None]
        cols["x"] = x_col
        model: ScalingLaw = PowerLaw()
    elif law == "chinchilla":
        n_col = _need(n_col, "--n-col", law)
        N = _numeric(df, n_col, "--n-col", name, True, "N, parameters")
        cols["N"] = n_col
        if d_col:
            D = _numeric(df, d_col, "--d-col", name, True, "D, tokens")
            cols["D"] = d_col
        elif c_col:
            C = _numeric(df, c_col, "--c-col", name, True, "C, FLOPs")
            D = C / (flops_per_param_token * N)
            cols["C"] = c_col
        else:
            raise ValueError(
                "the chinchilla law needs --d-col (tokens) or --c-col (FLOPs, D = C / (6 N))"
            )
        X = np.stack([N, D], axis=1)
        model = ChinchillaLaw()
    elif law == "multilingual":
        n_col = _need(n_col, "--n-col", law)
        w_col = _need(w_col, "--w-col", law)
        source_col = _need(source_col, "--source-col", law)
        N = _numeric(df, n_col, "--n-col", name, True, "N, parameters")
        w = _numeric(df, w_col, "--w-col", name, True, "mixture weight")
        big = w > 1
        if big.any():
            i = int(np.flatnonzero(big)[0])
            raise ValueError(
                f"{name}: column {w_col!r} (mixture weight) must be in (0, 1], row {i} has {float(w[i])!r}"
            )
        if source_col not in df.columns:
            raise ValueError(
                f"{name}: column {source_col!r} (--source-col) not found; available columns: {list(df.columns)}"
            )
        src = df[source_col]
        if src.isna().any():
            i = int(np.flatnonzero(src.isna().to_numpy())[0])
            raise ValueError(f"{name}: column {source_col!r} (source) is missing at row {i}")
        sources = sorted(src.astype(str).unique())
        index = {s: i for i, s in enumerate(sources)}
        X = np.stack([N, w, src.astype(str).map(index).to_numpy(dtype=float)], axis=1)
        cols.update(N=n_col, w=w_col, source=source_col)
        model = MultilingualLaw(sources)
    else:
        mixture_cols = list(_need(mixture_cols, "--mixture-cols or --mixture-prefix", law))
        X = np.stack(
            [
                _numeric(df, c, "--mixture-cols", name, False, "mixture proportion")
                for c in mixture_cols
            ],
            axis=1,
        )
        cols["mixture"] = mixture_cols
        model = MixingLaw(mixture_cols)
    try:
        X, y = model.check_inputs(X, y)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return Table(law=model, X=X, y=y, columns=cols, name=name)
