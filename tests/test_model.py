"""Model identities: scan == unrolled, explicit == jax.nn attention, packing isolation, RoPE relativity, GQA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmstages.model import Decoder, RegSites, attention_mask, rope, zero_rates
from tests.helpers import init_params, packed_batch, tiny


def _apply(cfg, params, batch, **kw):
  return Decoder(cfg, kw.pop("sites", RegSites())).apply({"params": params}, batch["inputs"], batch["positions"],
                                                         batch["segment_ids"], **kw).logits


def test_shapes_and_param_names():
  cfg = tiny(tie_embeddings=False)
  params = init_params(cfg)
  assert params["embed"]["embedding"].shape == (64, 32)
  assert params["lm_head"]["kernel"].shape == (32, 64)
  assert params["layers_0"]["attn"]["q"]["kernel"].shape == (32, 4, 8)
  assert params["layers_0"]["attn"]["k"]["kernel"].shape == (32, 2, 8)
  assert params["layers_2"]["mlp"]["down"]["kernel"].shape == (48, 32)
  logits = _apply(cfg, params, packed_batch())
  assert logits.shape == (4, 16, 64) and logits.dtype == jnp.float32


def test_scan_equals_unrolled():
  cfg = tiny()
  params = init_params(cfg)
  layers = [params[f"layers_{i}"] for i in range(cfg.num_layers)]
  scanned = {k: v for k, v in params.items() if not k.startswith("layers_")}
  scanned["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
  batch = packed_batch()
  a = _apply(cfg, params, batch)
  for remat in ("none", "full"):
    b = _apply(dataclasses.replace(cfg, scan_layers=True, remat=remat), scanned, batch)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_explicit_attention_equals_jax_dot_product_attention():
  cfg = tiny()  # GQA (4 query heads, 2 kv heads) on packed rows.
  params = init_params(cfg)
  batch = packed_batch()
  a = _apply(cfg, params, batch)
  b = _apply(dataclasses.replace(cfg, attention="auto"), params, batch)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_packed_documents_do_not_see_each_other():
  cfg = tiny()
  params = init_params(cfg)
  batch = packed_batch(docs_per_row=2)
  changed = {k: v.copy() for k, v in batch.items()}
  second = batch["segment_ids"] == 2
  changed["inputs"][second] = (changed["inputs"][second] + 7) % 60 + 3
  a, b = _apply(cfg, params, batch), _apply(cfg, params, changed)
  first = batch["segment_ids"] == 1
  np.testing.assert_array_equal(np.asarray(a)[first], np.asarray(b)[first])
  assert not np.allclose(np.asarray(a)[second], np.asarray(b)[second])


def test_packed_row_equals_documents_run_alone():
  cfg = tiny()
  params = init_params(cfg)
  batch = packed_batch(batch=1, docs_per_row=2)
  full = np.asarray(_apply(cfg, params, batch))
  for seg in (1, 2):
    idx = np.where(batch["segment_ids"][0] == seg)[0]
    alone = {k: v[:, idx] for k, v in batch.items()}
    out = np.asarray(_apply(cfg, params, alone))
    np.testing.assert_allclose(full[0, idx], out[0], rtol=1e-5, atol=1e-5)


def test_rope_is_relative():
  cfg = tiny()
  params = init_params(cfg)
  batch = packed_batch(docs_per_row=1)
  shifted = dict(batch, positions=batch["positions"] + 11)
  np.testing.assert_allclose(_apply(cfg, params, batch), _apply(cfg, params, shifted), rtol=2e-4, atol=2e-4)


def test_rope_matches_hugging_face_convention():
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
  pos = np.array([[0, 1, 5]], np.int32)
  out = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), 10000.0))
  # Hugging Face Llama: q * cos + rotate_half(q) * sin with cos = cat(freqs, freqs).
  inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
  freqs = pos[0][:, None] * inv[None]
  emb = np.concatenate([freqs, freqs], -1)[None, :, None, :]
  rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  np.testing.assert_allclose(out, x * np.cos(emb) + rot * np.sin(emb), rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa = tiny()
  mha = tiny(num_kv_heads=4)
  p = init_params(gqa)
  q = jax.tree.map(lambda x: x, p)
  for i in range(gqa.num_layers):
    for name in ("k", "v"):
      q[f"layers_{i}"]["attn"][name]["kernel"] = jnp.repeat(p[f"layers_{i}"]["attn"][name]["kernel"], 2, axis=1)
  batch = packed_batch()
  np.testing.assert_allclose(_apply(gqa, p, batch), _apply(mha, q, batch), rtol=1e-5, atol=1e-5)


def test_padding_rows_have_no_nan():
  cfg = tiny()
  batch = packed_batch()
  batch["segment_ids"][0] = 0
  assert np.isfinite(np.asarray(_apply(cfg, init_params(cfg), batch))).all()


def test_attention_mask_layout():
  seg = jnp.array([[1, 1, 2, 0]])
  m = np.asarray(attention_mask(seg, 4))[0]
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(m, expected)


@pytest.mark.parametrize("bad,msg", [(dict(num_kv_heads=3), "num_kv_heads"), (dict(remat="some"), "remat"),
                                     (dict(dtype="float33"), "dtype")])
def test_bad_model_config_names_the_key(bad, msg):
  with pytest.raises(ValueError, match=f"config.model.{msg}"):
    tiny(**bad).validate()
