"""Hugging Face import/export: logits parity with transformers' own Llama in both directions, bad-input errors,
the `python -m llmstages.hf` CLI round trip, and the HF tokenizer. Everything is built here; nothing downloads."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmstages import hf  # noqa: E402
from llmstages.model import Decoder  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int64)


def make_hf_model(path, tie=False, kv=2, head_dim=None, seed=0, dtype=torch.float32, **kw):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=kv, head_dim=head_dim,
                                 tie_word_embeddings=tie, rope_theta=5e4, rms_norm_eps=1e-6,
                                 max_position_embeddings=128, **kw)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # Norm scales start at 1; randomize them so a mixed-up norm cannot pass.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.to(dtype).save_pretrained(path, safe_serialization=True)
  return model


def hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def our_logits(mc, params, tokens=TOKENS):
  return np.asarray(Decoder(mc).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llama"))
  model = make_hf_model(path)
  return path, model


@pytest.mark.parametrize("tie,kv,head_dim,scan", [(False, 2, None, False), (True, 4, None, True),
                                                   (False, 1, 32, False)])
def test_import_matches_transformers_logits(tmp_path, tie, kv, head_dim, scan):
  model = make_hf_model(str(tmp_path), tie=tie, kv=kv, head_dim=head_dim)
  mc, params = hf.load(str(tmp_path), scan_layers=scan)
  assert (mc.tie_embeddings, mc.num_kv_heads, mc.dim_per_head, mc.rope_theta, mc.norm_eps) == \
      (tie, kv, head_dim or 16, 5e4, 1e-6)
  np.testing.assert_allclose(our_logits(mc, params), hf_logits(model), atol=1e-4, rtol=0)


def test_export_matches_our_logits_and_round_trips(tmp_path, llama_dir):
  src, _ = llama_dir
  mc, params = hf.load(src, scan_layers=True)
  # Move away from the imported values so the test sees our parameters, not a copy of the source files.
  params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)
  out = str(tmp_path / "export")
  hf.save(mc, params, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(hf_logits(reloaded), our_logits(mc, params), atol=1e-4, rtol=0)
  mc2, params2 = hf.load(out)  # Unrolled this time: the layout changes, the numbers do not.
  assert not mc2.scan_layers
  np.testing.assert_allclose(our_logits(mc2, params2), our_logits(mc, params), atol=1e-5, rtol=0)


def test_sharded_checkpoint_onto_a_mesh(tmp_path):
  model = make_hf_model(str(tmp_path))
  with open(tmp_path / "config.json") as f:
    cfg = json.load(f)
  mc = hf.config_from_hf(str(tmp_path))
  _, params = hf.load(str(tmp_path))
  hf.SHARD_BYTES, old = 100_000, hf.SHARD_BYTES  # Force several shards.
  try:
    out = str(tmp_path / "sharded")
    hf.save(mc, params, out)
  finally:
    hf.SHARD_BYTES = old
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
  mesh = jax.make_mesh((4,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  shard = lambda spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(
      (None,) * (x.ndim - 1) + ("tensor",) if x.shape[-1] % 4 == 0 else ())), params)
  _, placed = hf.load(out, abstract_params=abstract)
  q = placed["layers_0"]["attn"]["q"]["kernel"]
  assert q.sharding == shard((None, None, "tensor")) and q.addressable_shards[0].data.shape == (64, 4, 4)
  np.testing.assert_allclose(our_logits(mc, placed), hf_logits(model), atol=1e-4, rtol=0)
  assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_bfloat16_checkpoint_loads(tmp_path):
  model = make_hf_model(str(tmp_path), dtype=torch.bfloat16)
  mc, params = hf.load(str(tmp_path))
  assert params["embed"]["embedding"].dtype == jnp.float32
  ref = hf_logits(model.float())  # The bf16 weights, computed in f32 on both sides.
  np.testing.assert_allclose(our_logits(mc, params), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each error names the file or tensor at fault.

def _edit_config(path, **kw):
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(kw)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def test_unsupported_architectures(tmp_path):
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
  gpt2.save_pretrained(tmp_path / "gpt2")
  with pytest.raises(hf.HFFormatError, match=r"gpt2/config.json.*'GPT2LMHeadModel' is not supported"):
    hf.load(str(tmp_path / "gpt2"))
  mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1, sliding_window=16))
  mistral.save_pretrained(tmp_path / "mistral")
  with pytest.raises(hf.HFFormatError, match=r"mistral/config.json.*sliding_window=16"):
    hf.load(str(tmp_path / "mistral"))
  _edit_config(str(tmp_path / "mistral"), sliding_window=None)  # Without a window Mistral is a Llama.
  mc, params = hf.load(str(tmp_path / "mistral"))
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mistral").eval()
  np.testing.assert_allclose(our_logits(mc, params, TOKENS % 64), hf_logits(ref, TOKENS % 64), atol=1e-4, rtol=0)


def test_llama3_rope_scaling_is_a_clear_error(tmp_path, llama_dir):
  shutil.copytree(llama_dir[0], tmp_path / "m")
  _edit_config(str(tmp_path / "m"), rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0})
  with pytest.raises(hf.HFFormatError, match=r"config.json: rope scaling 'llama3' is not supported"):
    hf.load(str(tmp_path / "m"))


def test_missing_shard_wrong_shape_and_dtype(tmp_path, llama_dir):
  src, _ = llama_dir
  mc, params = hf.load(src)
  hf.SHARD_BYTES, old = 100_000, hf.SHARD_BYTES
  try:
    hf.save(mc, params, str(tmp_path / "sharded"))
  finally:
    hf.SHARD_BYTES = old
  os.remove(tmp_path / "sharded" / "model-00002-of-00004.safetensors")
  with pytest.raises(hf.HFFormatError, match=r"index.json lists shard 'model-00002-of-00004.safetensors'.*does not "
                                             r"exist"):
    hf.load(str(tmp_path / "sharded"))

  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(src, "model.safetensors"))
  bad = dict(tensors)
  bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 32), np.float32)
  os.makedirs(tmp_path / "shape")
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "shape")
  save_file(bad, str(tmp_path / "shape" / "model.safetensors"))
  with pytest.raises(hf.HFFormatError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has "
                                             r"shape \[96, 32\]; config.json implies \[96, 64\]"):
    hf.load(str(tmp_path / "shape"))

  bad = dict(tensors)
  bad["model.norm.weight"] = np.zeros((64,), np.int8)
  save_file(bad, str(tmp_path / "shape" / "model.safetensors"))
  with pytest.raises(hf.HFFormatError, match=r"tensor 'model.norm.weight' has dtype I8"):
    hf.load(str(tmp_path / "shape"))

  bad = dict(tensors)
  del bad["model.layers.0.self_attn.k_proj.weight"]
  bad["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
  save_file(bad, str(tmp_path / "shape" / "model.safetensors"))
  with pytest.raises(hf.HFFormatError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' is missing"):
    hf.load(str(tmp_path / "shape"))
  bad["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"]
  save_file(bad, str(tmp_path / "shape" / "model.safetensors"))
  with pytest.raises(hf.HFFormatError, match=r"no place in a Llama decoder.*q_proj.bias"):
    hf.load(str(tmp_path / "shape"))
