"""M4 input checks: binary attribute and label matrices, utilities, targets pi, bounds eps.

The lowest layer of the package (it imports nothing from it): the problem types, the
statistics, the solvers and the public API all validate their input here.
"""

from __future__ import annotations

import numpy as np


def validate_examples(attributes, labels, utility) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check shapes and binarity; returns (s (N, m), y (N, c), u (N,) float64 or None).

    Bool and integer arrays are returned as they are (no copy); other dtypes are checked to
    hold only 0 and 1.
    """
    s = _binary_matrix(attributes, "attributes")
    y = _binary_matrix(labels, "labels")
    if s.shape[1] == 0:
        raise ValueError("attributes has 0 columns: M4 needs at least one sensitive attribute")
    if len(s) != len(y):
        raise ValueError(f"attributes has {len(s)} rows but labels has {len(y)}: one row per example")
    if len(s) == 0:
        raise ValueError("no examples: attributes and labels have 0 rows")
    u = None
    if utility is not None:
        u = np.asarray(utility, dtype=np.float64)
        if u.shape != (len(s),):
            raise ValueError(f"utility must have shape ({len(s)},), got {u.shape}")
        bad = np.flatnonzero(~np.isfinite(u))
        if bad.size:
            raise ValueError(f"utility must be finite; row {bad[0]} is {u[bad[0]]!r}")
    return s, y, u


def _binary_matrix(values, key: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1 and key == "attributes":
        array = array[:, None]  # one attribute given as (N,)
    if array.ndim != 2:
        raise ValueError(f"{key} must be a 2-D (examples, columns) array, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{key} must be bool or numeric 0/1, got dtype {array.dtype}")
    bad = (array != 0) & (array != 1)  # NaN compares unequal to both, so it is caught too
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{key} must be binary (0/1): column {col} has value {array[row, col].item()!r} at row {row}"
        )
    return array


def validate_pi(pi, m: int) -> np.ndarray:
    """(m,) float64 targets in [0, 1] from a scalar or a length-m sequence."""
    array = np.asarray(pi, dtype=np.float64)
    if array.ndim > 1 or (array.ndim == 1 and array.shape != (m,)):
        raise ValueError(f"pi must be a scalar or have shape ({m},) (one per attribute), got {array.shape}")
    array = np.broadcast_to(array, (m,)).copy()
    if not (np.isfinite(array).all() and (array >= 0).all() and (array <= 1).all()):
        raise ValueError(f"pi must be in [0, 1], got {array.tolist()}")
    return array


def _validate_eps(value, shape: tuple[int, ...], key: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    try:
        array = np.broadcast_to(array, shape).copy()
    except ValueError:
        raise ValueError(f"{key} must be a scalar or broadcast to shape {shape}, got {array.shape}") from None
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{key} must be finite and >= 0, got {value!r}")
    return array
