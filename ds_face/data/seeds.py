"""Every value a run draws from its seed, in one place: each a pure function of (seed, where in the run), so a
resume or a resize on any world size draws exactly what an uninterrupted run draws, with no state to save.

Each derivation is kept bit for bit as runs have drawn it (a change would give a run being resumed another
sample order, other flips, other synthetic rows or other negatives). One change so far: the head's negatives
and initial centres moved from per-rank draws to per-class-block draws (the same on any world size); a
checkpoint from before resumes with its weights and momentum and draws the new negatives from then on:

* ``rng(*key)``: numpy's SeedSequence over the key: the epoch's shard order and each shard's row permutation;
* ``mix(seed, a, b)``: the keys weighted by splitmix64's odd constants, summed mod 2**64; ``splitmix64``
  finalises such a sum into well-mixed bits: the flips (``flip_bits``), the head's initial weights per class
  block (``init_seed``); Partial FC's negatives use the same sum and finaliser on torch tensors
  (``ds_face.head.sampling.hash64``);
* the synthetic dataset's label of a row, its noise and its class pattern (``synthetic_labels``,
  ``noise_seed``, ``pattern_seed``).
"""
from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio, odd: splitmix64's increment
MIX1 = 0xBF58476D1CE4E5B9  # splitmix64's two multipliers
MIX2 = 0x94D049BB133111EB
WEIGHTS = (GOLDEN, MIX1, MIX2)
MASK = 2**64 - 1


def rng(*key: int) -> np.random.Generator:
    """A numpy Generator fixed by the key (each part taken as a non-negative 63-bit integer)."""
    return np.random.default_rng([int(k) & (2**63 - 1) for k in key])


def mix(seed: int, *keys):
    """``seed * GOLDEN + keys[0] * MIX1 + keys[1] * MIX2`` mod 2**64: an int for ints; a uint64 array when a
    key is a numpy array (uint64 arithmetic wraps exactly like the mod)."""
    if len(keys) > len(WEIGHTS) - 1:
        raise ValueError(f"mix takes a seed and at most {len(WEIGHTS) - 1} keys, got {len(keys)}")
    total = int(seed) * GOLDEN & MASK
    with np.errstate(over="ignore"):
        for key, weight in zip(keys, WEIGHTS[1:]):
            if isinstance(key, np.ndarray):
                total = np.asarray(total, np.uint64) + key.astype(np.uint64) * np.uint64(weight)
            else:
                total = total + (int(key) * weight & MASK)
                if not isinstance(total, np.ndarray):
                    total &= MASK
    return total


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 values: every output bit depends on every input bit."""
    u = np.uint64
    with np.errstate(over="ignore"):
        x = (x ^ (x >> u(30))) * u(MIX1)
        x = (x ^ (x >> u(27))) * u(MIX2)
    return x ^ (x >> u(31))


def flip_bits(seed: int, epochs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A fair coin per sample fixed by (seed, epoch, dataset row): the same flip after a resume, wherever."""
    return (splitmix64(mix(seed, epochs, rows)) & np.uint64(1)).astype(bool)


def init_seed(seed: int, block: int) -> int:
    """The head's N(0, 0.01) initial weights of one block of classes (``ds_face.head.sampling.BLOCK``): the same
    centres on any world size (a non-negative 63-bit torch seed)."""
    return int(splitmix64(np.asarray(mix(seed, block), np.uint64))) % 2**63


def synthetic_labels(seed: int, rows: np.ndarray, num_classes: int) -> np.ndarray:
    """The synthetic dataset's label of each row (int64)."""
    mixed = (rows.astype(np.uint64) * np.uint64(GOLDEN)) ^ np.uint64(seed * MIX1 & MASK)
    mixed ^= mixed >> np.uint64(31)
    return (mixed % np.uint64(num_classes)).astype(np.int64)


def noise_seed(seed: int, epoch: int, row: int) -> int:
    """The synthetic image noise of (epoch, row): a 64-bit torch seed (large run seeds wrap, never overflow)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + row) % 2**64


def pattern_seed(label: int) -> int:
    """A synthetic class's colour pattern: the class alone, the same on every rank and in every run."""
    return int(label) * 7919 + 17
