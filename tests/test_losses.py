"""The cross-entropy's hand-written gradient (`losses.logit_stats`) against autodiff of the textbook formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmstages import losses


def _reference_loss(logits, targets, mask, smoothing, z_loss):
  v = logits.shape[-1]
  labels = jax.nn.one_hot(targets, v) * (1 - smoothing) + smoothing / v
  ce = optax.softmax_cross_entropy(logits, labels)
  logz = jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum((ce + z_loss * logz**2) * mask)


@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_loss_and_gradient_match_autodiff_of_the_formula(smoothing, z_loss):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = 3 * jax.random.normal(k1, (2, 5, 11))
  targets = jax.random.randint(k2, (2, 5), 0, 11)
  mask = (jax.random.uniform(k3, (2, 5)) > 0.3).astype(jnp.float32)
  ours = lambda x: losses.next_token_loss(x, targets, mask, smoothing, z_loss)[0]
  ref = lambda x: _reference_loss(x, targets, mask, smoothing, z_loss)
  np.testing.assert_allclose(ours(logits), ref(logits), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), rtol=1e-5, atol=1e-6)


def test_token_logprobs_and_its_gradient_match_log_softmax():
  logits = 2 * jax.random.normal(jax.random.key(1), (3, 4, 9))
  targets = jax.random.randint(jax.random.key(2), (3, 4), 0, 9)
  weights = jax.random.normal(jax.random.key(3), (3, 4))
  ref = lambda x: jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.token_logprobs(logits, targets), ref(logits), rtol=1e-5, atol=1e-6)
  g_ours = jax.grad(lambda x: jnp.sum(losses.token_logprobs(x, targets) * weights))(logits)
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) * weights))(logits)
  np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_correct_counts_argmax_hits():
  logits = jnp.array([[[0.0, 2.0, 1.0], [5.0, 1.0, 1.0], [0.0, 0.0, 3.0]]])
  targets = jnp.array([[1, 2, 2]])
  _, count, metrics = losses.next_token_loss(logits, targets, jnp.ones((1, 3)))
  assert float(count) == 3 and float(metrics["correct"]) == 2
