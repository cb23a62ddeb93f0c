"""Hugging Face import/export: logits parity with transformers' own Llama in both directions, bad-input errors,
the `python -m llmstages.hf` CLI round trip, and the HF tokenizer. Everything is built here; nothing downloads."""

import functools
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
  cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=kv, head_dim=head_dim,
                                 tie_word_embeddings=tie, rms_norm_eps=1e-6,
                                 max_position_embeddings=256, **{"rope_theta": 5e4, **kw})
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


@functools.lru_cache(maxsize=None)
def _forward(mc):
  return jax.jit(lambda params, tokens: Decoder(mc).apply({"params": params}, tokens).logits)


def our_logits(mc, params, tokens=TOKENS):
  return np.asarray(_forward(mc)(params, jnp.asarray(tokens, jnp.int32)))


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


def test_llama3_rope_scaling_matches_transformers(tmp_path, llama_dir):
  # A short original context, so the scaling changes every band of frequencies at these 64 positions.
  rope = {"rope_type": "llama3", "rope_theta": 5e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
  model = make_hf_model(str(tmp_path / "m"), rope_parameters=rope)
  tokens = np.random.default_rng(1).integers(0, 256, (1, 64))
  mc, params = hf.load(str(tmp_path / "m"))
  assert mc.rope_scaling_factor == 8.0 and mc.rope_original_max_len == 16
  ours = our_logits(mc, params, tokens)
  np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4, rtol=0)
  import dataclasses
  assert np.abs(our_logits(dataclasses.replace(mc, rope_scaling_factor=0.0), params, tokens) - ours).max() > 1e-3
  hf.save(mc, params, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=1e-4, rtol=0)
  shutil.copytree(llama_dir[0], tmp_path / "yarn")
  _edit_config(str(tmp_path / "yarn"), rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0})
  with pytest.raises(hf.HFFormatError, match=r"yarn/config.json: rope scaling 'yarn' is not supported"):
    hf.load(str(tmp_path / "yarn"))


def test_missing_shard_wrong_shape_and_dtype(tmp_path, llama_dir):
  src, _ = llama_dir
  mc, params = hf.load(src)
  hf.SHARD_BYTES, old = 100_000, hf.SHARD_BYTES
  try:
    hf.save(mc, params, str(tmp_path / "sharded"))
  finally:
    hf.SHARD_BYTES = old
  shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[1]
  os.remove(tmp_path / "sharded" / shard)
  with pytest.raises(hf.HFFormatError, match=rf"index.json lists shard '{shard}'.*does not exist"):
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


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and CLI.

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def add_tokenizer(path, vocab=300, template=CHAT_TEMPLATE):
  """A byte-level BPE tokenizer.json (trained here on a few sentences) with a chat template."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(["hello world, the cat sat on the mat"] * 50, trainer)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template,
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return tok


def test_hf_tokenizer_matches_transformers(tmp_path):
  from llmstages.data import HFTokenizer
  add_tokenizer(str(tmp_path))
  ours = HFTokenizer(str(tmp_path))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = "hello world, the dog sat on a mat 123"
  assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
  assert ours.decode(ours.encode(text)) == text
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.eos_token_id)
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  for gen in (False, True):
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  import pickle
  assert pickle.loads(pickle.dumps(ours)).encode(text) == ours.encode(text)


def test_chat_data_is_rendered_in_the_models_template(tmp_path):
  from llmstages.data import HFTokenizer, chat, tokenize_document
  add_tokenizer(str(tmp_path), template=CHATML)
  ours = HFTokenizer(str(tmp_path))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
          {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "the mat"},
          {"role": "assistant", "content": "sat on"}]
  ref_ids = lambda m, gen=False: ref.encode(ref.apply_chat_template(m, tokenize=False, add_generation_prompt=gen),
                                            add_special_tokens=False)
  # An eval / RL prompt in our template is encoded as the model's template renders it.
  assert ours.encode(chat.format_chat(msgs[:4], add_generation_prompt=True)) == ref_ids(msgs[:4], True)
  # A training chat: same tokens as the model's rendering; loss exactly on assistant turns and their closing text.
  ids, flags = tokenize_document(ours, chat.chat_segments(chat.format_chat(msgs)))
  assert ids.tolist() == [ours.bos_id] + ref_ids(msgs) + [ours.eos_id]
  full = ref_ids(msgs)
  expect = np.zeros(len(full), bool)
  for i in (3, 5):  # Tokens added by assistant turn i: rendered(msgs[:i]) -> rendered(msgs[:i] + gen) -> ...
    lo, hi = len(ref_ids(msgs[:i - 1], True)), len(ref_ids(msgs[:i]))
    expect[lo:hi] = True
  assert flags[1:-1].tolist() == expect.tolist()
  assert ours.decode(ids[1:-1][flags[1:-1]]) == "the cat<|im_end|>\nsat on<|im_end|>\n"
  # A preference pair: only the final (chosen) answer carries loss.
  prompt = chat.format_chat(msgs[:4], add_generation_prompt=True)
  ids, flags = tokenize_document(ours, [(prompt, False), (" sat on" + chat.END, True)])
  assert ids.tolist() == [ours.bos_id] + full + [ours.eos_id]
  assert ours.decode(ids[flags]) == "sat on<|im_end|>\n"


def test_cli_import_generate_export(tmp_path, llama_dir):
  from llmstages import load
  from llmstages import workdir as workdir_lib
  from llmstages.hf import commands as cli
  src = str(tmp_path / "src")
  shutil.copytree(llama_dir[0], src)
  tok = add_tokenizer(src)
  model = llama_dir[1]
  work = str(tmp_path / "work")
  cli.import_model(src, work, "base", scan_layers=True)
  assert workdir_lib.stage_finished(work, "base")
  # generate --stage=base: greedy continuation equals transformers' greedy generate.
  prompt = "hello world"
  out = load.generate(work, "base", [prompt], max_new_tokens=6, temperature=0.0)
  ids = [1] + tok.encode(prompt).ids
  with torch.no_grad():
    ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0, len(ids):]
  from llmstages.data import HFTokenizer
  assert out[0]["samples"][0] == HFTokenizer(src).decode(ref.tolist())
  cli.export_model(work, "base", str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(hf_logits(reloaded), hf_logits(model), atol=1e-4, rtol=0)
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).encode("the cat") == \
      transformers.AutoTokenizer.from_pretrained(src).encode("the cat")


def test_imported_stage_that_was_never_imported_says_how(tmp_path, llama_dir):
  from llmstages import train
  from llmstages.hf import commands as cli
  config = cli.import_config(llama_dir[0])
  with pytest.raises(RuntimeError, match=r"config.base is imported, not trained: run `python -m llmstages.hf "
                                         r"import --hf_dir=.*--stage=base` first"):
    train.run_stage(config, "base", str(tmp_path), tokenizer=object())


def test_finetune_config_builds_every_stage_from_the_imported_model(tmp_path, llama_dir):
  from llmstages import inputs, train
  from tests.helpers import load_config, one_device_mesh
  src = str(tmp_path / "src")
  shutil.copytree(llama_dir[0], src)
  add_tokenizer(src)
  with pytest.raises(ValueError, match="needs hf_dir=DIR"):
    load_config("finetune.py", "smoke")
  for arg in (f"hf_dir={src},smoke", f"hf_dir={src},smoke,lora"):
    c = load_config("finetune.py", arg)
    assert c.stages == ("base", "sft", "instruct", "dpo", "grpo") and c.data.tokenizer == src
    assert [c[s].init_from for s in c.stages] == ["", "base", "sft", "instruct", "dpo"]
    mc = hf.config_from_hf(src)
    assert (c.model.d_model, c.model.num_kv_heads, c.model.rope_theta) == (mc.d_model, 2, 5e4)
    assert inputs.tokenizer_for(c).vocab_size == transformers.AutoTokenizer.from_pretrained(src).vocab_size
    for name in c.stages:
      ctx = train.build_context(c, name, mesh=one_device_mesh())
      assert bool(ctx.lora) == ("lora" in arg and name != "base")
      assert "world_facts" in c[name].evals
