"""Imports flow one way: each module imports only from its own layer or the layers below, with no cycles.

The layers (README, "Layout"):
  L0  model, losses, partitioning, regularization, checkpoint, text, registry, seeds, lora, sampler, config,
      roofline, cli, torch_ref, hf (conversion)
  L1  data/, rewards, workdir (stage directories, final-parameter I/O), inputs (batch wiring), batching
  L2  stages/            (never imports train)
  L3  train/             (context, step, loop)
  L4  evals/
  L5  entry points: pipeline, main, generate, load, serve, openai_api, bench, bench_serve, aot, compare, sweep/,
      experiments, hf.commands
Modules are read with `ast`, not imported. An import inside a function is allowed only for an optional heavy
dependency, with a comment saying so; a function-level import of llmstages itself hides a cycle and fails.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = {
    0: ["model", "losses", "partitioning", "regularization", "checkpoint", "text", "registry", "seeds", "lora",
        "sampler", "config", "roofline", "cli", "torch_ref", "hf", "hf.adapters"],
    1: ["data", "rewards", "workdir", "inputs", "batching"],
    2: ["stages"],
    3: ["train", "metrics"],
    4: ["evals"],  # TEMP
    5: ["pipeline", "main", "generate", "load", "serve", "openai_api", "bench", "bench_serve", "aot", "compare",
        "sweep", "experiments", "hf.commands", "hf.__main__"],
}

# Optional heavy dependencies that may be imported inside a function (with a comment on that line or above).
OPTIONAL = ("torch", "transformers", "peft", "matplotlib", "fastapi", "uvicorn", "starlette", "pydantic", "httpx",
            "libtpu", "nltk", "optuna", "sqlalchemy", "psycopg", "tensorboardX", "jax.experimental.topologies")


def _modules() -> dict[str, str]:
  mods = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "llmstages")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        mods[name.removesuffix(".__init__")] = path
  return mods


def layer_of(module: str) -> int:
  """The layer of `llmstages.a.b`: the longest listed prefix wins (hf.commands over hf)."""
  rel = module.removeprefix("llmstages").lstrip(".")
  if not rel:
    return 0  # The package's own __init__ imports nothing of it.
  best, best_len = None, -1
  for layer, names in LAYERS.items():
    for n in names:
      if (rel == n or rel.startswith(n + ".")) and len(n) > best_len:
        best, best_len = layer, len(n)
  if best is None:
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and the README")
  return best


def _imports(module: str, path: str, mods: dict[str, str]):
  """(target module, line, inside a function, has a comment) for every import in `path`."""
  src = open(path).read()
  lines = src.splitlines()
  tree = ast.parse(src)
  is_pkg = path.endswith("__init__.py")
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for sub in ast.walk(node):
        in_function.add(id(sub))
  for node in ast.walk(tree):
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    if isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module or ""
      targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    else:
      targets = [a.name for a in node.names]
    line = lines[node.lineno - 1]
    commented = "#" in line or (node.lineno > 1 and lines[node.lineno - 2].strip().startswith("#"))
    for target in targets:
      while target not in mods and "." in target and target.startswith("llmstages"):
        target = target.rsplit(".", 1)[0]
      yield target, node.lineno, id(node) in in_function, commented


def _graph():
  mods = _modules()
  edges, problems = {m: set() for m in mods}, []
  for module, path in sorted(mods.items()):
    for target, line, inside, commented in _imports(module, path, mods):
      where = f"{os.path.relpath(path, ROOT)}:{line}"
      if target.startswith("llmstages"):
        if inside:
          problems.append(f"{where}: {module} imports {target} inside a function (a hidden cycle)")
        elif target != module:
          edges[module].add(target)
          if layer_of(target) > layer_of(module):
            problems.append(f"{where}: {module} (L{layer_of(module)}) imports {target} (L{layer_of(target)})")
      elif inside and not (target.split(".")[0] in OPTIONAL or target in OPTIONAL):
        problems.append(f"{where}: {module} imports {target} inside a function; only optional heavy "
                        f"dependencies {OPTIONAL} may be")
      elif inside and not commented:
        problems.append(f"{where}: {module} imports {target} inside a function without a comment saying why")
  return edges, problems


def _cycles(edges) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_every_module_has_a_layer():
  for module in _modules():
    layer_of(module)


def test_imports_go_down_and_not_inside_functions():
  _, problems = _graph()
  assert not problems, "\n".join(problems)


def test_no_import_cycles():
  edges, _ = _graph()
  assert not _cycles(edges), _cycles(edges)


def test_checker_sees_an_upward_import(tmp_path):
  # The rules above are only as good as the parser: an upward edge and a cycle must be caught.
  assert layer_of("llmstages.hf.commands") == 5 and layer_of("llmstages.hf") == 0
  assert layer_of("llmstages.stages.rl") == 2
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  with pytest.raises(AssertionError, match="in no layer"):
    layer_of("llmstages.nowhere")
