"""The single-category embedding memory bank (after MemAE, Gong et al., ICCV 2019).

Each position of the one-class embedding is replaced by (or added to) a sparse convex
combination of N learned prototypes of the normal class, so that the decoder sees only
what normal images look like and reconstructs anomalies badly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SHRINK_EPS = 1e-12


def hard_shrink(w: jax.Array, shrink: float, grad: str = 'exact') -> jax.Array:
  """MemAE's continuous hard shrinkage, relu(w - lambda) * w / (|w - lambda| + eps):
  weights below lambda become exactly zero, the others (nearly) keep their value.

  grad 'exact' differentiates the formula as it stands (as MemAE's code does). Its
  derivative has the term w * eps / (w - lambda + eps)^2 above lambda, negligible unless
  w is within about 1e-6 of lambda, where it spikes (about 5800 one float32 step above
  lambda = 0.02) by an amount that the rounding of w decides. With softmax(cos / tau)
  at tau = 1 the weights lie near lambda = 1/N, so such spikes come every few steps;
  trained so, the memory's reads collapsed onto a few slots on the CPU and not on a GPU
  (README, "The memory bank's shrinkage gradient"). grad 'masked' computes the same
  values and holds the mask relu(w - lambda) / (|w - lambda| + eps) constant in the
  gradient: d/dw = the mask, 1 above lambda, 0 below it.
  """
  if grad == 'exact':
    return nn.relu(w - shrink) * w / (jnp.abs(w - shrink) + SHRINK_EPS)
  if grad != 'masked':
    raise ValueError(f"shrink grad must be 'masked' or 'exact', got {grad!r}")
  mask = jax.lax.stop_gradient(nn.relu(w - shrink) / (jnp.abs(w - shrink) + SHRINK_EPS))
  return w * mask


def read_weights(
  z: jax.Array, memory: jax.Array, temperature: float, shrink: float, shrink_grad: str = 'exact'
) -> jax.Array:
  """Addressing weights of each query over the memory slots.

  Args:
    z: (P, D) queries.
    memory: (N, D) slots.
    temperature: tau in softmax(cos(z, m) / tau).
    shrink: lambda of the hard shrinkage; 0 disables it.
    shrink_grad: how the shrinkage is differentiated, see `hard_shrink`.

  Returns:
    (P, N) non-negative weights summing to 1 over N.
  """
  zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  mn = memory / jnp.maximum(jnp.linalg.norm(memory, axis=-1, keepdims=True), 1e-8)
  w = jax.nn.softmax(zn @ mn.T / temperature, axis=-1)
  if shrink > 0:
    shrunk = hard_shrink(w, shrink, shrink_grad)
    total = jnp.sum(shrunk, axis=-1, keepdims=True)
    # A row with no weight above lambda (an exactly uniform softmax, e.g. for an all-zero
    # query) would read nothing; it keeps its soft weights instead.
    w = jnp.where(total > 0, shrunk / (total + SHRINK_EPS), w)
  return w


def position_entropy(w: jax.Array) -> jax.Array:
  """-sum_k w_k log(w_k + 1e-12) of each query; w: (..., N) -> (...)."""
  return -jnp.sum(w * jnp.log(w + SHRINK_EPS), axis=-1)


def entropy(w: jax.Array) -> jax.Array:
  """Mean over queries of `position_entropy`; w: (P, N)."""
  return jnp.mean(position_entropy(w))


def threshold(shrink: float | None, slots: int) -> float:
  """The hard shrinkage's threshold λ: `shrink`, or MemAE's 1 / N when it is None."""
  return 1.0 / slots if shrink is None else shrink


def read(
  z: jax.Array,
  memory: jax.Array,
  temperature: float,
  shrink: float | None,
  mode: str,
  gate: jax.Array | None = None,
  shrink_grad: str = 'exact',
) -> tuple[jax.Array, jax.Array]:
  """What the memory makes of the embedding z (..., D): (z', weights (..., N)).

  memory: (N, D) slots; shrink None means 1 / N; mode 'replace' gives z' = w M,
  'residual' z' = z + gate * w M. The weights are computed in float32 whatever z's dtype.
  MemoryBank's forward, as a function of its parameters (evaluate.memory_usage reads a
  trained bank with it).
  """
  n, d = memory.shape
  shrink = threshold(shrink, n)
  w = read_weights(z.reshape(-1, d).astype(jnp.float32), memory, temperature, shrink, shrink_grad)
  zhat = (w @ memory).reshape(z.shape).astype(z.dtype)
  out = zhat if mode == 'replace' else z + gate.astype(z.dtype) * zhat
  return out, w.reshape(*z.shape[:-1], n)


class MemoryBank(nn.Module):
  """z: (B, h, w, D) -> (z', entropy scalar, weights (B, h, w, N)).

  mode 'replace': z' = w M; 'residual': z' = z + g * w M with g a learned scalar
  starting at 0; 'off': z' = z (and entropy 0).
  """

  slots: int = 50
  temperature: float = 1.0
  shrink: float | None = None  # None means 1 / slots
  mode: str = 'replace'
  shrink_grad: str = 'exact'  # see hard_shrink

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.mode == 'off':
      return z, jnp.zeros((), jnp.float32), jnp.zeros((*z.shape[:-1], 0), jnp.float32)
    if self.mode not in ('replace', 'residual'):
      raise ValueError(f"memory mode must be 'replace', 'residual' or 'off', got {self.mode!r}")
    d = z.shape[-1]
    bound = 1.0 / jnp.sqrt(d)  # MemAE's uniform init
    memory = self.param(
      'memory', lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound), (self.slots, d)
    )
    gate = self.param('gate', nn.initializers.zeros, ()) if self.mode == 'residual' else None
    out, w = read(z, memory, self.temperature, self.shrink, self.mode, gate, self.shrink_grad)
    return out, entropy(w.reshape(-1, self.slots)), w


def usage(weights, query, embedding) -> dict:
  """How the memory is read, from its weights and the embedding before and after it.

  Args:
    weights: (..., N) read weights of some positions (numpy or jax).
    query: (..., D) the embedding before the memory at those positions.
    embedding: (..., D) the embedding after it.

  Returns:
    slots: N.
    slots_read: how many slots are the largest weight of at least one position. A
      bank whose reads have collapsed onto a few prototypes uses few of its slots.
    effective_slots: the mean over positions of exp(entropy of the weights): 1 when
      every position reads a single slot, N when it reads all of them evenly.
    relative_change: the mean over positions of ||embedding - query|| / ||query||, what
      the memory changes: near 0 means a 'residual' memory that the decoder ignores.
  """
  w = np.asarray(weights, np.float64)
  n = w.shape[-1]
  w = w.reshape(-1, n)
  entropy_per_position = np.asarray(position_entropy(w), np.float64)
  q = np.asarray(query, np.float64).reshape(w.shape[0], -1)
  change = np.asarray(embedding, np.float64).reshape(q.shape) - q
  norms = np.maximum(np.linalg.norm(q, axis=-1), 1e-12)
  return {
    'slots': int(n),
    'slots_read': int(np.unique(np.argmax(w, axis=-1)).size),
    'effective_slots': float(np.mean(np.exp(entropy_per_position))),
    'relative_change': float(np.mean(np.linalg.norm(change, axis=-1) / norms)),
  }
