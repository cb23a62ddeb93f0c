"""Regularization: each site moves the train loss and never the eval loss; masks on named parameters; schedules;
traced rates do not recompile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmstages import regularization as reg_lib
from llmstages import train
from llmstages.inputs import TokenBatch
from llmstages.model import init_params
from tests.helpers import one_device_mesh, packed_batch, tiny_config

ALL_SITES = {"embed_dropout": 0.2, "attn_dropout": 0.2, "residual_dropout": 0.2, "mlp_dropout": 0.2,
             "drop_path": 0.5, "neftune_alpha": 15.0, "label_smoothing": 0.2}


def _losses(reg, seed=0):
  """(train loss, eval loss) of one batch under `reg`, from the same parameters."""
  cfg = tiny_config(reg=reg)
  ctx = train.build_context(cfg, "pretrain", mesh=one_device_mesh())
  params = init_params(ctx.eval_model, jax.random.key(seed))
  batch = TokenBatch.from_dict(jax.tree.map(jnp.asarray, packed_batch(vocab=64)))
  step_values = jax.tree.map(jnp.asarray, ctx.step_values_at(0))
  with ctx.activate():
    tr = ctx.stage.loss(ctx.model, params, batch, step_values, jax.random.key(1), True)
    ev = ctx.stage.loss(ctx.model, params, batch, None, None, False)
  return float(tr[0] / tr[1]), float(ev[0] / ev[1])


def test_all_off_train_equals_eval():
  tr, ev = _losses({})
  assert tr == ev


@pytest.mark.parametrize("site", sorted(ALL_SITES))
def test_each_site_changes_train_loss_only(site):
  base_train, base_eval = _losses({})
  tr, ev = _losses({site: ALL_SITES[site]})
  assert tr != pytest.approx(base_train, rel=1e-6), site
  assert ev == base_eval, site


def test_dropout_inherits_and_site_overrides():
  cfg = tiny_config(reg={"dropout": 0.1, "attn_dropout": 0.0})
  rates = reg_lib.site_rates(cfg.pretrain.reg)
  assert rates == {"embed_dropout": 0.1, "attn_dropout": 0.0, "residual_dropout": 0.1, "mlp_dropout": 0.1}
  sites = reg_lib.sites(cfg.pretrain.reg)
  assert sites.embed_dropout and not sites.attn_dropout and sites.mlp_dropout and not sites.drop_path


def test_rates_depth_schedule_and_last_k_exemption():
  cfg = tiny_config(reg={"dropout": 0.1, "drop_path": 0.3, "exempt_last_k_layers": 1})
  r = reg_lib.rates_at(cfg.pretrain.reg, 0, 10, 3)["rates"]
  np.testing.assert_allclose(r["drop_path"], [0.1, 0.2, 0.0], rtol=1e-6)
  np.testing.assert_allclose(r["attn_dropout"], [0.1, 0.1, 0.0], rtol=1e-6)
  assert float(r["embed_dropout"]) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [1, 1, 1, 1]), ("early", [1, 1, 0, 0]), ("late", [0, 0, 1, 1]), ("linear", [1, .75, .5, .25]),
    ("linear_up", [0, .25, .5, .75])])
def test_schedules(schedule, expected):
  cfg = tiny_config(reg={"schedule": schedule, "schedule_fraction": 0.5})
  got = [reg_lib.schedule_factor(cfg.pretrain.reg, s, 4) for s in range(4)]
  np.testing.assert_allclose(got, expected)


def test_weight_decay_mask_on_named_params():
  cfg = tiny_config(reg={"exempt_last_k_layers": 1})
  ctx = train.build_context(cfg, "pretrain", mesh=one_device_mesh())
  mask = ctx.weight_decay_mask()
  assert float(mask["final_norm"]["scale"]) == 0.0
  assert float(mask["layers_0"]["attn_norm"]["scale"]) == 0.0
  assert float(mask["layers_0"]["attn"]["q"]["kernel"]) == 1.0
  assert float(mask["layers_1"]["mlp"]["up"]["kernel"]) == 1.0
  assert float(mask["layers_2"]["mlp"]["up"]["kernel"]) == 0.0  # Exempt: the last layer.
  assert float(mask["embed"]["embedding"]) == 1.0


def test_weight_decay_mask_scanned_layers():
  from llmstages import config as config_lib
  cfg = tiny_config(reg={"exempt_last_k_layers": 2})
  cfg.unlock()
  cfg.model.scan_layers = True
  ctx = train.build_context(cfg, "pretrain", mesh=one_device_mesh())
  mask = ctx.weight_decay_mask()
  q = mask["layers"]["block"]["attn"]["q"]["kernel"]
  assert q.shape == (3, 1, 1, 1)
  np.testing.assert_array_equal(q.ravel(), [1, 0, 0])
  assert float(mask["layers"]["block"]["attn_norm"]["scale"]) == 0.0


def test_weight_decay_skips_masked_params_in_the_step():
  """With zero gradients (loss_mask 0) only weight decay moves parameters: norms must stay, kernels shrink."""
  cfg = tiny_config(reg={"weight_decay": 0.5, "exempt_last_k_layers": 1}, warmup_steps=0, grad_clip=0.0)
  ctx = train.build_context(cfg, "pretrain", mesh=one_device_mesh())
  state = ctx.init_state()
  before = jax.device_get(state.params)
  batch = packed_batch(batch=8)
  batch["loss_mask"][:] = 0
  with ctx.activate():
    state, _ = ctx.jit_train_step()(state, TokenBatch.from_dict(batch), ctx.step_values_at(0))
  after = jax.device_get(state.params)
  np.testing.assert_array_equal(before["layers_0"]["attn_norm"]["scale"], after["layers_0"]["attn_norm"]["scale"])
  np.testing.assert_array_equal(before["layers_2"]["attn"]["q"]["kernel"], after["layers_2"]["attn"]["q"]["kernel"])
  lr = float(ctx.lr_fn(0))
  np.testing.assert_allclose(after["layers_0"]["attn"]["q"]["kernel"],
                             before["layers_0"]["attn"]["q"]["kernel"] * (1 - lr * 0.5), rtol=1e-6)


def test_changing_a_rate_does_not_recompile():
  cfg = tiny_config(reg={"dropout": 0.1, "drop_path": 0.1, "neftune_alpha": 5.0, "label_smoothing": 0.1})
  ctx = train.build_context(cfg, "pretrain", mesh=one_device_mesh())
  step = ctx.jit_train_step()
  batch = TokenBatch.from_dict(packed_batch(batch=8))
  losses = []
  with ctx.activate():
    for scale in (1.0, 2.0, 0.0):
      step_values = jax.tree.map(lambda x: np.asarray(x * scale, x.dtype), ctx.step_values_at(0))
      _, m = step(ctx.init_state(), batch, step_values)
      losses.append(float(m["loss_sum"]))
  assert step._cache_size() == 1
  assert len(set(losses)) == 3


def test_z_loss_changes_train_loss_only():
  base_train, base_eval = _losses({})
  tr, ev = _losses({"z_loss": 1e-2})
  assert tr > base_train and ev == base_eval


def test_neftune_scale_uses_each_documents_true_length():
  from llmstages.model import neftune_scale
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 0, 0]])
  s = np.asarray(neftune_scale(seg, (1, 8, 16), 5.0))[0]
  np.testing.assert_allclose(s[:4], 5.0 / np.sqrt(4 * 16), rtol=1e-6)
  np.testing.assert_allclose(s[4:6], 5.0 / np.sqrt(2 * 16), rtol=1e-6)
  np.testing.assert_array_equal(s[6:], 0.0)  # Padding gets no noise.


def test_dropout_and_drop_path_rescale_kept_values():
  from llmstages.model import dropout
  x = jnp.ones((64, 32, 16))
  y = np.asarray(dropout(x, jnp.float32(0.25), jax.random.key(0)))
  assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
  assert abs((y == 0).mean() - 0.25) < 0.01 and abs(y.mean() - 1.0) < 0.02
  rows = np.asarray(dropout(x, jnp.float32(0.5), jax.random.key(1), broadcast_dims=(1, 2)))
  per_row = rows.reshape(64, -1)
  assert all(len(np.unique(r)) == 1 for r in per_row)  # Drop-path drops a sequence's whole branch.
  assert set(np.unique(per_row)) == {0.0, 2.0}
