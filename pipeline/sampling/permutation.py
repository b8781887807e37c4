"""Stateless seeded permutations of [0, n) with O(1) random access.

The sampler visits each source in a fresh permutation every epoch. Materialising a
permutation costs 8 bytes per document per source and must be rebuilt on resume; a keyed
Feistel network is a bijection on [0, 4^h) that maps any position straight to its image,
so resuming at draw 10^9 costs the same as draw 0. Cycle-walking (re-applying the network
until the value falls below n) restricts it to [0, n) and stays a bijection; the domain is
under 4n, so it walks fewer than 4 times on average.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ROUNDS = 6


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a strong 64-bit mixing function, elementwise on uint64."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def hash_key(*parts: int | np.ndarray) -> np.ndarray:
    """Fold integers or int arrays (seed, source, epoch, ...) into 64-bit keys (broadcast).

    Returns a 0-d array when every part is a scalar, else an array of the broadcast shape.
    """
    arrays = [np.asarray(part).astype(np.int64).astype(np.uint64) for part in parts]
    key = np.zeros(np.broadcast_shapes(*(a.shape for a in arrays)), dtype=np.uint64)
    for part in arrays:
        key = mix64(key ^ part)
    return key


def permute(positions: np.ndarray, n: int | np.ndarray, keys: np.ndarray | np.uint64) -> np.ndarray:
    """Image of `positions` under the permutation of [0, n) selected by `keys`.

    Args:
        positions: (K,) int64, each in [0, its n).
        n: domain size (>= 1), one for all positions or (K,) one per position, so a
            single call serves many sources (the per-call cost dominates small batches).
        keys: a uint64 key, or (K,) uint64, one per position (e.g. one per epoch).

    Returns:
        (K,) int64; for a fixed (n, key), distinct positions give distinct images.
    """
    positions = np.asarray(positions, dtype=np.int64)
    sizes = np.broadcast_to(np.asarray(n, dtype=np.int64), positions.shape)
    if sizes.size and sizes.min() < 1:
        raise ValueError(f"permutation domain must have n >= 1, got {int(sizes.min())}")
    if positions.size and ((positions < 0).any() or (positions >= sizes).any()):
        raise ValueError("positions must lie in [0, n)")
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), positions.shape)
    # Balanced Feistel on [0, 4^h) with 4^h >= n (h >= 1): fewer than 4 walks on average.
    bit_length = np.ceil(np.log2(np.maximum(sizes, 2).astype(np.float64))).astype(np.int64)
    exact = (np.int64(1) << bit_length) >= sizes  # guard float rounding of log2
    bit_length = np.where(exact, bit_length, bit_length + 1)
    half_bits = np.maximum(1, (bit_length + 1) // 2).astype(np.uint64)
    out = np.zeros(positions.shape, dtype=np.int64)  # n = 1 maps 0 -> 0
    # Cycle-walk only the elements still outside [0, n), compacted after every walk: the
    # slowest element of a batch decides the number of walks (~10 for small batches), and
    # round keys are mixed once per call, not once per walk.
    (index,) = np.nonzero(sizes > 1)
    values, limit, half_bits = positions[index].astype(np.uint64), sizes[index].astype(np.uint64), half_bits[index]
    round_keys = np.stack(_round_keys(keys[index]))
    while index.size:
        values = _feistel(values, round_keys, half_bits)
        outside = values >= limit
        done = ~outside
        out[index[done]] = values[done].astype(np.int64)
        index, values, limit, half_bits = index[outside], values[outside], limit[outside], half_bits[outside]
        round_keys = round_keys[:, outside]
    return out


def _round_keys(keys: np.ndarray) -> list[np.ndarray]:
    return [mix64(keys ^ np.uint64(round_index * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF))
            for round_index in range(_ROUNDS)]


def _feistel(values: np.ndarray, round_keys: np.ndarray, half_bits: np.ndarray) -> np.ndarray:
    """One pass of a balanced Feistel network on [0, 2^(2*half_bits)), elementwise.

    round_keys: (_ROUNDS, K) uint64, from `_round_keys`."""
    mask = (np.uint64(1) << half_bits) - np.uint64(1)
    left, right = values >> half_bits, values & mask
    for round_index in range(_ROUNDS):
        left, right = right, left ^ (mix64(right ^ round_keys[round_index]) & mask)
    return (left << half_bits) | right
