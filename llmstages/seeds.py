"""Seeds derived from names: the one scheme by which a stage's RNG streams (parameter init, dropout, rollouts)
depend on the run seed and the stage's name.

A name enters as the eight 32-bit words of its SHA-256 digest, so two names share a stream only if SHA-256
collides. (The scheme before this one used the first 4 bytes of the name XOR its length, so `sft_a` and `sft_b`
drew identical dropout masks, and the RL sampler used a second, CRC-32 scheme.)
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def name_words(name: str) -> tuple[int, ...]:
  """The SHA-256 digest of `name` (UTF-8) as eight unsigned 32-bit words."""
  digest = hashlib.sha256(name.encode()).digest()
  return tuple(int.from_bytes(digest[i:i + 4], "little") for i in range(0, len(digest), 4))


def stage_key(seed: int, name: str) -> jax.Array:
  """A stage's JAX key: `jax.random.key(seed)` with every word of the name's hash folded in."""
  key = jax.random.key(seed)
  for word in name_words(name):
    key = jax.random.fold_in(key, np.uint32(word))
  return key


def stage_seed(seed: int, name: str, *extra: int) -> int:
  """A 32-bit integer seed (numpy or the sampler) from the run seed, the name's hash and further non-negative
  integers (split, step), mixed by numpy's SeedSequence."""
  return int(np.random.SeedSequence([seed, *name_words(name), *extra]).generate_state(1)[0])
