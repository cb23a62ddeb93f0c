"""LoRA: merge identities, PEFT parity (adapters exported in PEFT format load in `peft` with the same logits), and
an imported random Llama fine-tuned with LoRA: the loss falls, only adapters have optimizer state, the base is
bit-identical, and the merged export reloads in transformers."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from llmstages import config as config_lib  # noqa: E402
from llmstages import checkpoint, hf, lora, pipeline, train  # noqa: E402
from llmstages import workdir as workdir_lib  # noqa: E402
from llmstages.hf import adapters as adapters_lib  # noqa: E402
from llmstages.hf import commands  # noqa: E402
from tests.helpers import one_device_mesh, read_metrics  # noqa: E402
from tests.test_hf import TOKENS, add_tokenizer, hf_logits, make_hf_model, our_logits  # noqa: E402

ALL = ("attn/(q|k|v|o)/kernel$", "mlp/(gate|up|down)/kernel$", "lm_head/kernel$")


def lora_config(rank=4, alpha=8.0, dropout=0.0, targets=ALL):
  c = config_lib.lora_config()
  c.update(dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets))
  return c


def init_adapters(params, cfg, seed=0):
  return jax.jit(lambda p, k: lora.init(p, cfg, k))(params, jax.random.key(seed))  # Eager, each op compiles.


def random_adapters(params, cfg, seed=0):
  """Adapters with b != 0 (fresh ones have b = 0 and change nothing)."""
  def make(p, k):
    ad = lora.init(p, cfg, k)
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.fold_in(k, 1), x.shape), ad)
  return jax.jit(make)(params, jax.random.key(seed))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llama"))
  model = make_hf_model(path)
  add_tokenizer(path)
  return path, model


def test_fresh_adapters_change_nothing_and_merge_is_w_plus_scaled_ab(llama):
  for scan in (False, True):
    mc, params = hf.load(llama[0], scan_layers=scan)
    cfg = lora_config(targets=("attn/o/kernel$", "mlp/down/kernel$"))
    fresh = init_adapters(params, cfg)
    merge = jax.jit(lambda p, a: lora.merge(p, a, cfg))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), merge(params, fresh), params))
    ad = random_adapters(params, cfg)
    merged = merge(params, ad)
    path = ("layers", "block") if scan else ("layers_1",)
    node = lambda t: t[path[0]][path[1]] if scan else t[path[0]]
    a, b = node(ad)["attn"]["o"]["kernel"]["a"], node(ad)["attn"]["o"]["kernel"]["b"]
    w = node(params)["attn"]["o"]["kernel"]
    a1, b1, w1 = (a[1], b[1], w[1]) if scan else (a, b, w)
    expect = w1 + 2.0 * np.einsum("nhr,rd->nhd", a1, b1)
    got = node(merged)["attn"]["o"]["kernel"]
    np.testing.assert_allclose(got[1] if scan else got, expect, rtol=1e-6, atol=1e-6)
    assert jnp.array_equal(node(merged)["attn"]["q"]["kernel"], node(params)["attn"]["q"]["kernel"])


def test_bad_targets_name_the_key(llama):
  _, params = hf.load(llama[0])
  with pytest.raises(ValueError, match=r"config.tune.lora.targets=\('nothing',\) match no parameter"):
    lora.init(params, lora_config(targets=("nothing",)), jax.random.key(0), "config.tune")
  with pytest.raises(ValueError, match=r"'layers_0/attn_norm/scale' .*matches but is not a projection kernel"):
    lora.init(params, lora_config(targets=("norm/scale",)), jax.random.key(0), "config.tune")


def test_peft_adapter_matches_peft_logits(tmp_path, llama):
  for scan in (False, True):
    mc, params = hf.load(llama[0], scan_layers=scan)
    cfg = lora_config()
    ad = random_adapters(params, cfg, seed=3)
    out = str(tmp_path / f"peft{scan}")
    adapters_lib.save_peft(mc, ad, cfg.rank, cfg.alpha, out, base_model=llama[0])
    base = transformers.AutoModelForCausalLM.from_pretrained(llama[0])
    with torch.no_grad():
      plain = base(torch.tensor(TOKENS)).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    ours = our_logits(mc, jax.jit(lambda p, a: lora.merge(p, a, cfg))(params, ad))
    assert np.abs(ours - plain).max() > 1e-2  # The adapters matter.
    np.testing.assert_allclose(hf_logits(peft_model), ours, atol=1e-4, rtol=0)


def finetune_config(src, work_text, **lora_kw):
  c = ml_collections.ConfigDict(commands.import_config(src).to_dict())
  c.tune = config_lib.stage_config("tune", kind="pretrain", data=f"file:{work_text}", init_from="base", steps=20,
                                   batch_size=4, seq_len=32, learning_rate=1e-2, warmup_steps=0,
                                   lr_schedule="constant", eval_every=0, checkpoint_every=10, log_every=1, evals=())
  c.tune.reg.weight_decay = 0.0
  c.tune.lora.update(dict(rank=4, alpha=8.0, **lora_kw))
  c.stages = ("base", "tune")
  c.data.dir = os.path.join(os.path.dirname(work_text), "data")
  return config_lib.finalize(c)


def test_lora_finetune_trains_adapters_only_and_exports(tmp_path, llama):
  src = llama[0]
  work = str(tmp_path / "work")
  commands.import_model(src, work, "base")
  text = str(tmp_path / "text.txt")
  with open(text, "w") as f:
    f.write("\n".join(["the cat sat on the mat. hello world, the cat sat on the mat."] * 40))
  config = finetune_config(src, text, dropout=0.1)
  pipeline.run(config, work, mesh=one_device_mesh())

  # A random model's logits are tiny (init std 0.02), so the loss moves slowly; accuracy shows the learning.
  losses, acc = read_metrics(work, "tune", "train/loss"), read_metrics(work, "tune", "train/accuracy")
  assert np.mean([losses[s] for s in (18, 19, 20)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.3
  assert np.mean([acc[s] for s in (18, 19, 20)]) > 0.3 > acc[1]
  ctx = train.build_context(config, "tune", mesh=one_device_mesh())
  base = workdir_lib.load_final_params(work, "base", ctx.abstract_params)
  adapters, meta = workdir_lib.load_final_lora(work, "tune", ctx.abstract_state.params)
  assert meta["rank"] == 4 and adapters["layers_0"]["attn"]["q"]["kernel"]["a"].shape == (64, 4)
  # Only adapters have optimizer state; the base passed through the stage bit for bit.
  ckpt = checkpoint.Checkpointer(os.path.join(work, "tune", "checkpoints"))
  try:
    _, state, _ = ckpt.restore_latest(ctx.abstract_state)
  finally:
    ckpt.close()
  n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert n_opt == 2 * n_adapter  # Adam's two moments, of the adapters only.
  assert n_adapter < 0.2 * sum(x.size for x in jax.tree.leaves(base))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.base, base))
  # final_params is the merged model (what later stages and evaluators read).
  final = workdir_lib.load_final_params(work, "tune", ctx.abstract_params)
  merged = jax.jit(lambda p, a: lora.merge(p, a, config.tune.lora))(base, adapters)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.allclose(a, b, atol=1e-6)), final, merged))
  ours = our_logits(ctx.model_cfg, final)
  assert np.abs(ours - our_logits(ctx.model_cfg, base)).max() > 1e-2

  commands.export_model(work, "tune", str(tmp_path / "merged"), mesh=one_device_mesh())
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  np.testing.assert_allclose(hf_logits(reloaded), ours, atol=1e-4, rtol=0)
  commands.export_model(work, "tune", str(tmp_path / "peft"), peft=True, mesh=one_device_mesh())
  with open(tmp_path / "peft" / "adapter_config.json") as f:
    assert json.load(f)["base_model_name_or_path"] == os.path.abspath(src)
  peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src),
                                              str(tmp_path / "peft")).eval()
  np.testing.assert_allclose(hf_logits(peft_model), ours, atol=1e-4, rtol=0)


def test_memory_rows_count_what_lora_trains():
  rows = {(r["model"], r["mode"]): r for r in commands.memory_rows(rank=16)}
  for name, m in commands.MEMORY_MODELS.items():
    d, f, y = m["d_model"], m["mlp_dim"], m["num_layers"]
    h = m.get("head_dim") or d // m["num_heads"]
    q, kv = m["num_heads"] * h, m["num_kv_heads"] * h
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)  # r * (in + out) per projection.
    full, lo = rows[(name, "full")], rows[(name, "LoRA r=16")]
    assert lo["trainable"] == 16 * y * per_layer
    assert full["trainable"] == full["parameters"] == lo["parameters"]
    for r in (full, lo):  # AdamW: two float32 moments per trained parameter (plus a step count).
      assert 0 <= r["optimizer_bytes"] - 8 * r["trainable"] < 64
  assert rows[("SmolLM-135M", "full")]["parameters"] == 134_515_008  # The published SmolLM-135M count.


def test_lora_state_is_sharded_beside_its_kernels():
  from tests.helpers import tiny_config
  c = ml_collections.ConfigDict(tiny_config().to_dict())
  c.model.scan_layers = True
  c.pretrain.lora.update(dict(rank=4))
  c.mesh.update(dict(data=1, fsdp=2, tensor=2))
  ctx = train.build_context(config_lib.finalize(c), "pretrain",
                            mesh=jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                                               axis_types=(jax.sharding.AxisType.Auto,) * 3))
  spec = lambda x: tuple(x.spec)
  up = ctx.state_sharding.params["layers"]["block"]["mlp"]["up"]["kernel"]
  assert spec(ctx.state_sharding.base["layers"]["block"]["mlp"]["up"]["kernel"]) == (None, "fsdp", "tensor")
  assert (spec(up["a"]), spec(up["b"])) == ((None, "fsdp", None), (None, None, "tensor"))
  mu = ctx.state_sharding.opt_state[1].mu["layers"]["block"]["mlp"]["up"]["kernel"]
  assert spec(mu["a"]) == spec(up["a"])
  state = ctx.init_state()
  assert state.params["layers"]["block"]["mlp"]["up"]["kernel"]["a"].shape == (3, 32, 4)
  assert not jnp.any(state.params["layers"]["block"]["mlp"]["up"]["kernel"]["b"])
