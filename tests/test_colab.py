"""The Colab notebooks (colab/*.ipynb): committed without outputs, and each executed end to end with smoke=True."""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

import nbformat
import pytest

from tests.helpers import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def _read(path: str):
  with open(path) as f:
    return nbformat.read(f, as_version=4)


def _source(nb, kind: str = "code") -> str:
  return "\n".join(c.source for c in nb.cells if c.cell_type == kind)


def test_there_are_notebooks():
  assert [os.path.basename(p) for p in NOTEBOOKS] == ["01_pipeline.ipynb", "02_sweep_and_compare.ipynb",
                                                            "03_finetune_hf.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_stripped_and_complete(path):
  nb = _read(path)
  nbformat.validate(nb)
  name = os.path.basename(path)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, \
          f"{name} cell {i} has outputs: run python colab/strip_outputs.py"
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "smoke = False" in params[0].source, f"{name}: one `parameters` cell, smoke = False"
  text = _source(nb, "markdown")
  assert BADGE in text and f"/blob/main/colab/{name})" in text, f"{name}: no Open-in-Colab badge for itself"
  assert "Runtime" in text and "TPU" in text and "CPU" in text, f"{name}: no note on the Colab runtime"
  code = _source(nb)
  assert "import google.colab" in code and "import llmstages" in code, f"{name}: no guarded install cell"
  assert "jax.devices()" in code, f"{name}: no device cell"
  assert "/tmp" not in code and "~/" not in code and "expanduser" not in code, f"{name}: a path outside its workdir"


def test_strip_outputs_leaves_a_committable_notebook(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("strip_outputs", os.path.join(ROOT, "colab", "strip_outputs.py"))
  strip_outputs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(strip_outputs)
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("1 + 1")])
  nb.cells[1].execution_count = 3
  nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)]
  nb.cells[1].metadata["papermill"] = {"duration": 0.1}
  nb.metadata["papermill"] = {"parameters": {"smoke": True}}
  path = str(tmp_path / "nb.ipynb")
  nbformat.write(nb, path)
  strip_outputs.strip(path)
  out = _read(path)
  assert out.cells[1].outputs == [] and out.cells[1].execution_count is None and out.cells[1].source == "1 + 1"
  assert "papermill" not in out.cells[1].metadata and "papermill" not in out.metadata
  assert out.cells[0].source == "# t"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """The kernel runs this interpreter with this checkout importable, on one CPU device, whatever else is set up.

  A kernelspec named python3 in a directory first on JUPYTER_PATH points at sys.executable, so neither a missing
  kernelspec nor one for another Python can change what runs."""
  spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "Python 3 (llmstages tests)", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  saved = dict(os.environ)
  os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(spec_dir.parent.parent),
                                                             saved.get("JUPYTER_PATH", "")]))
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, saved.get("PYTHONPATH", "")]))
  os.environ["XLA_FLAGS"] = one_device_env()["XLA_FLAGS"]  # One CPU device, as Colab's CPU runtime has.
  for key in ("LLMSTAGES_DATA_DIR", "JAX_COMPILATION_CACHE_DIR", "MPLBACKEND"):
    os.environ.pop(key, None)  # The notebook must set up its own data dir; nothing may leak in from outside.
  os.environ["JAX_PLATFORMS"] = "cpu"
  yield
  os.environ.clear()
  os.environ.update(saved)


def execute(name: str, cwd, **parameters):
  """Runs colab/NAME with smoke=True in `cwd`; returns (the executed notebook, seconds). A cell error raises."""
  import papermill
  out = os.path.join(cwd, "executed_" + name)
  start = time.perf_counter()
  papermill.execute_notebook(os.path.join(ROOT, "colab", name), out, parameters={"smoke": True, **parameters},
                             kernel_name="python3", cwd=str(cwd), progress_bar=False, start_timeout=120,
                             execution_timeout=600)
  seconds = time.perf_counter() - start
  print(f"\n{name} with smoke=True: {seconds:.0f} s", flush=True)
  return _read(out), seconds


def _outputs(nb, marker: str) -> list[dict]:
  """The outputs of the one code cell whose source contains `marker`."""
  cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
  assert len(cells) == 1, f"{len(cells)} cells contain {marker!r}"
  return cells[0].outputs


def _text(outputs) -> str:
  return "".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
                 for o in outputs)


def _pngs(outputs) -> int:
  return sum("image/png" in o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result"))


def test_pipeline_notebook_runs(kernel_env, tmp_path, record_property):
  nb, seconds = execute("01_pipeline.ipynb", tmp_path)
  record_property("seconds", round(seconds))
  workdir = tmp_path / "llmstages_pipeline"
  assert sorted(os.listdir(tmp_path)) == ["executed_01_pipeline.ipynb", "llmstages_pipeline"]  # Nothing else.
  assert (workdir / "data").is_dir() and os.listdir(workdir / "data"), "corpora were not built in the workdir"
  stages = json.loads((workdir / "pipeline.json").read_text())["stages"]
  assert stages == ["pretrain", "sft", "reward"]
  evals = {s: json.loads((workdir / s / "eval.json").read_text())["metrics"] for s in stages}
  assert all("perplexity/loss" in evals[s] and "arith/greedy" in evals[s] for s in ("pretrain", "sft"))
  assert "stage/accuracy" in evals["reward"]
  assert "1 cpu device(s)" in _text(_outputs(nb, "print(jax.devices())"))
  assert _pngs(_outputs(nb, "plot_stage_metrics(stage)")) == len(stages)  # One figure per stage.
  assert _pngs(_outputs(nb, "eval.json after each stage")) == 1
  markdown = [o for o in _outputs(nb, 'WORKDIR, "results.md"') if "text/markdown" in o.get("data", {})]
  assert len(markdown) == 1 and "| pretrain |" in markdown[0].data["text/markdown"]
  samples = _text(_outputs(nb, "generate.generate("))  # From sft: the reward model has a scalar head.
  assert samples.count("=== [sft,") == 2 and samples.count("vote: ") == 2 and "[3] " in samples


def test_sweep_notebook_runs(kernel_env, tmp_path, record_property):
  # capacity:smoke is the cheapest shipped smoke sweep (4 one-stage runs; dropout_vs_facts:smoke, the notebook's
  # default, runs two stages 4 times). One worker, the notebook's default: the first run fills the sweep's
  # compilation cache and the other three read it (two workers would compile everything twice at once, beside the
  # other test worker; test_sweep.py runs sweeps of two workers).
  nb, seconds = execute("02_sweep_and_compare.ipynb", tmp_path, experiment="capacity")
  record_property("seconds", round(seconds))
  workdir = tmp_path / "llmstages_sweep"
  assert sorted(os.listdir(tmp_path)) == ["executed_02_sweep_and_compare.ipynb", "llmstages_sweep"]
  assert os.listdir(workdir / "data") and os.listdir(workdir / "jax_cache")
  sweep = json.loads((workdir / "sweep.json").read_text())
  assert sweep["experiment"] == "capacity:smoke"
  runs = [r["hash"] for r in sweep["runs"]]
  assert runs and all((workdir / "runs" / h / "result.json").exists() for h in runs)
  report = [o for o in _outputs(nb, "display(Markdown(f.read()))") if "text/markdown" in o.get("data", {})]
  assert len(report) == 1 and f"{len(runs)} of {len(runs)} planned runs finished" in report[0].data["text/markdown"]
  assert _pngs(_outputs(nb, ".pareto.png")) == 1 and _pngs(_outputs(nb, ".trajectory.png")) == 1
  assert "1 cpu device(s)" in _text(_outputs(nb, "import jax; print(jax.devices())"))
  # Progress: a line per change of state (a few per run: start, done) plus one per --progress_every=30 s, not one
  # per 5 s poll.
  log = _text(_outputs(nb, "llmstages.sweep"))
  progress = [line for line in log.splitlines() if line.startswith("[sweep]") and "| elapsed" in line]
  assert len(progress) <= 3 * len(runs) + 2 + seconds / 30, f"{len(progress)} progress lines in {seconds:.0f} s"


def _train_lines(workdir) -> list[str]:
  return (workdir / "capitals_train.jsonl").read_text().splitlines()


def test_finetune_notebook_runs(kernel_env, tmp_path, record_property):
  nb, seconds = execute("03_finetune_hf.ipynb", tmp_path)
  record_property("seconds", round(seconds))
  workdir = tmp_path / "llmstages_finetune"
  assert sorted(os.listdir(tmp_path)) == ["executed_03_finetune_hf.ipynb", "llmstages_finetune"]
  assert json.loads((workdir / "pipeline.json").read_text())["stages"] == ["base", "instruct"]
  assert "1 cpu device(s)" in _text(_outputs(nb, "print(jax.devices())"))
  assert f"{len(_train_lines(workdir))} examples OK" in _text(_outputs(nb, "llmstages.data.validate"))
  baseline = _text(_outputs(nb, "scores[f\"base, {k}-shot, held-out\"]"))
  assert "base 0-shot: " in baseline and "base 4-shot: " in baseline
  # LoRA moved the model: the loss on assistant tokens fell over the stage.
  losses = re.search(r"train/loss ([\d.]+) -> ([\d.]+)", _text(_outputs(nb, "plt.plot(steps, losses")))
  first, last = float(losses[1]), float(losses[2])
  assert last < first - 1.0, losses[0]
  assert _pngs(_outputs(nb, "plt.plot(steps, losses")) == 1
  after = _text(_outputs(nb, "fine-tune minus the best baseline"))
  assert "instruct, 0-shot, held-out" in after and "instruct, 0-shot, training countries" in after
  # The PEFT adapter over the imported model gives the merged export's logits.
  export = workdir / "export"
  assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(export / "adapter"))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(export / "merged"))
  gap_line = next(l for l in _text(_outputs(nb, "peft.PeftModel.from_pretrained")).splitlines() if "max |logit" in l)
  assert float(gap_line.rsplit("=", 1)[1]) < 1e-4, gap_line
