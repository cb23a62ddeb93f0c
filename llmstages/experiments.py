"""What an experiment file uses, and finding experiments: the `experiments` package, one module per experiment.

An experiment module (`experiments/NAME.py`) defines
  get_config(arg)  the base config, locked (usually a config from the `configs` package: `from configs import
                   quickstart`, then `quickstart.get_config(...)`);
  get_sweep(arg)   plain Python that lists the runs: dicts of dotted config overrides ('pretrain.reg.dropout')
                   plus 'seed' and an optional 'setting' name; runs that differ only in their seed share a setting.
                   `grid`, `zip_`, `product`, `seeds` and `setting` below build such lists;
  METRICS          eval.json keys to compare ('bios_facts/memorization/mean_greedy'); the first is the headline;
  PARETO           optional (x_key, y_key) of the scatter plot, e.g. (diversity, factual accuracy);
  BASELINE         optional: the setting that paired differences are taken against (default: the first one);
and a docstring whose first line `python -m llmstages.sweep --list` shows. `arg` is the text after ':'
(`dropout_vs_facts:smoke`); every experiment accepts `smoke`, which shrinks it to run in seconds for tests.
Experiments are found by listing the `experiments` package and imported by name (`importlib`, never a static
import: llmstages does not depend on them). A file path works in place of a name
(`--experiment=/path/to/my_exp.py:smoke`) for an experiment kept outside the package.

A run's identity is a hash of its fully resolved config (the seed is `config.seed`), so the same run reached from
two experiments, or planned twice, is the same run, and a changed base config makes new runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import pkgutil
import sys
from types import ModuleType
from typing import Any, Iterable, Sequence

# The directory holding the llmstages package: the repository root, or site-packages once installed (where the
# `configs` and `experiments` packages are installed beside it).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_PACKAGE = "experiments"
CONFIGS_PACKAGE = "configs"

META_KEYS = ("seed", "setting")  # Keys of a sweep entry that are not dotted config overrides.


# ---------------------------------------------------------------------------------------------------------------
# Building sweeps: lists of dicts.

def grid(axes: dict[str, Sequence[Any]]) -> list[dict]:
  """Every combination: grid({'a': [1, 2], 'b': [3]}) -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zip_(axes: dict[str, Sequence[Any]]) -> list[dict]:
  """Values taken together: zip_({'a': [1, 2], 'b': [3, 4]}) -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zip_ needs equally long value lists, got lengths {lengths}")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def product(*lists: Iterable[dict]) -> list[dict]:
  """Every combination of one entry from each list, merged (later lists win on a shared key)."""
  out = []
  for parts in itertools.product(*[list(x) for x in lists]):
    merged: dict = {}
    for p in parts:
      merged.update(p)
    out.append(merged)
  return out


# Seeds per setting of a full experiment. compare's paired t-interval claims a difference of 3 standard deviations
# (of the per-seed difference) 75% of the time at 3 seeds and 99.8% at 5, at the same 5% false-claim rate.
DEFAULT_SEEDS = 5


def seeds(n: int, start: int = 0) -> list[dict]:
  return [{"seed": s} for s in range(start, start + n)]


def arg_options(arg: str, known: set[str], where: str) -> dict:
  """An experiment's arg 'a,b=1' as {'a': '', 'b': '1'}; a name not in `known` is an error naming `where`."""
  opts = dict(o.partition("=")[::2] for o in filter(None, arg.split(",")))
  unknown = set(opts) - known
  if unknown:
    raise ValueError(f"{where}: unknown arg(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
  return opts


def seed_count(opts: dict, default: int, where: str) -> int:
  """The `seeds=N` of an experiment's parsed arg (`default` without one); `where` names the experiment's file."""
  if "seeds" not in opts:
    return default
  if not opts["seeds"].isdigit() or int(opts["seeds"]) < 1:
    raise ValueError(f"{where}: seeds={opts['seeds']!r}; give a positive whole number, e.g. seeds={DEFAULT_SEEDS}")
  return int(opts["seeds"])


def setting(name: str, overrides: dict | None = None, **more) -> dict:
  """One named setting: setting('dropout@pretrain', {'pretrain.reg.dropout': 0.1})."""
  return {"setting": name, **(overrides or {}), **more}


def config_module(name: str) -> ModuleType:
  """The module `configs.<name>` (name 'capacity.py' or 'capacity'), for helpers it defines beside get_config."""
  return _import_package_module(CONFIGS_PACKAGE, name.removesuffix(".py"))


def config_file(name: str, arg: str = ""):
  """`get_config(arg)` of `configs/<name>` (e.g. 'quickstart.py'), loaded as `--config=configs/NAME:ARG` would."""
  return config_module(name).get_config(arg)


# ---------------------------------------------------------------------------------------------------------------
# Runs and experiments.

@dataclasses.dataclass(frozen=True)
class Run:
  """One planned run: a setting at a seed, its config overrides and its fully resolved config."""
  setting: str
  seed: int
  overrides: dict  # Dotted key -> value; 'seed' and 'setting' not included.
  config: Any  # The locked, resolved ml_collections config.

  @property
  def config_json(self) -> str:
    return canonical_json(self.config)

  @property
  def hash(self) -> str:
    return hashlib.sha256(self.config_json.encode()).hexdigest()[:16]

  def to_json(self) -> dict:
    return {"setting": self.setting, "seed": self.seed, "overrides": self.overrides, "hash": self.hash}


def canonical_json(config) -> str:
  return json.dumps(json.loads(config.to_json_best_effort(sort_keys=True)), sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass
class Experiment:
  """One experiment at one arg: its module (get_config, get_sweep, METRICS, ...) and what `load` was given."""
  name: str
  arg: str
  path: str
  module: ModuleType

  @property
  def spec(self) -> str:
    """What `load` takes back: 'NAME:ARG' for a module of the package, 'PATH:ARG' for a file elsewhere."""
    where = self.name if self.module.__name__ == f"{EXPERIMENTS_PACKAGE}.{self.name}" else self.path
    return f"{where}:{self.arg}" if self.arg else where

  @property
  def description(self) -> str:
    doc = (self.module.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else "(no docstring)"

  @property
  def metrics(self) -> tuple[str, ...]:
    metrics = tuple(getattr(self.module, "METRICS", ()))
    if not metrics:
      raise ValueError(f"experiment {self.name} ({self.path}) defines no METRICS (eval.json keys to compare)")
    return metrics

  @property
  def pareto(self) -> tuple[str, str] | None:
    pareto = getattr(self.module, "PARETO", None)
    return tuple(pareto) if pareto else None

  def base_config(self):
    return self.module.get_config(self.arg)

  def resolve(self, entry: dict) -> Run:
    """A sweep entry (overrides + 'seed' + optional 'setting') -> a Run with its config resolved and locked."""
    overrides = {k: v for k, v in entry.items() if k not in META_KEYS}
    config = self.base_config()
    for key, value in overrides.items():
      set_key(config, key, value, where=f"experiment {self.name}: override {key}={value!r}")
    seed = int(entry.get("seed", config.seed))
    config.seed = seed
    name = entry.get("setting") or setting_name(overrides)
    return Run(setting=str(name), seed=seed, overrides={k: _jsonable(v) for k, v in overrides.items()},
               config=config)

  def runs(self) -> list[Run]:
    entries = self.module.get_sweep(self.arg)
    runs = [self.resolve(e) for e in entries]
    seen: dict[str, Run] = {}
    for run in runs:
      if run.hash in seen:
        other = seen[run.hash]
        raise ValueError(f"experiment {self.name}: runs ({run.setting}, seed {run.seed}) and ({other.setting}, seed "
                         f"{other.seed}) resolve to the same config; give them different overrides or seeds")
      seen[run.hash] = run
    by_setting: dict[str, dict] = {}
    for run in runs:  # One name, one set of overrides: the report groups runs by setting.
      if by_setting.setdefault(run.setting, run.overrides) != run.overrides:
        raise ValueError(f"experiment {self.name}: setting {run.setting!r} is used for different overrides "
                         f"{by_setting[run.setting]} and {run.overrides}")
    return runs

  @property
  def baseline(self) -> str:
    settings = [r.setting for r in self.runs()]
    explicit = getattr(self.module, "BASELINE", None)
    if explicit and explicit not in settings:
      raise ValueError(f"experiment {self.name}: BASELINE={explicit!r} is not one of its settings "
                       f"{sorted(set(settings))}")
    return explicit or settings[0]


def setting_name(overrides: dict) -> str:
  if not overrides:
    return "base"
  return ",".join(f"{k}={v}" for k, v in overrides.items())


def set_key(config, key: str, value: Any, where: str = "") -> None:
  """config['a.b.c'] = value on a locked config; lists become tuples (config sequences are tuples)."""
  if isinstance(value, list):
    value = tuple(value)
  node = config
  parts = key.split(".")
  try:
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  except (KeyError, AttributeError, TypeError) as e:
    raise type(e)(f"{where or key}: {e}") from None


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------------------------
# Finding experiments.

def _import_package(package: str) -> ModuleType:
  """The top-level package `configs` or `experiments`; a clear error when it is not importable."""
  try:
    return importlib.import_module(package)
  except ModuleNotFoundError as e:
    if e.name != package:
      raise
    raise ModuleNotFoundError(f"the `{package}` package is not importable: run from the repository root, or "
                              f"install the repository (pip install . or -e .; an install made before {package}/ "
                              f"was a package must be redone), which installs {package}/ too") from e


def _import_package_module(package: str, name: str) -> ModuleType:
  _import_package(package)
  return importlib.import_module(f"{package}.{name}")


def _package_dir() -> str:
  return os.path.dirname(os.path.abspath(_import_package(EXPERIMENTS_PACKAGE).__file__))


def names() -> list[str]:
  """The experiments: the modules of the `experiments` package."""
  return sorted(m.name for m in pkgutil.iter_modules([_package_dir()]) if not m.ispkg and not m.name.startswith("_"))


def load(spec: str) -> Experiment:
  """'NAME[:ARG]' (the module experiments.NAME) or 'PATH.py[:ARG]' -> the Experiment."""
  where, _, arg = spec.partition(":") if not spec.endswith(".py") else (spec, "", "")
  if where.endswith(".py") or os.sep in where:
    path = os.path.abspath(where)
    name = os.path.basename(path).removesuffix(".py")
    in_package = os.path.dirname(path) == _package_dir() and name in names()
    module = _import_experiment(name) if in_package else _load_file(path, name)
  else:
    name, module = where, _import_experiment(where)
  for fn in ("get_config", "get_sweep"):
    if not callable(getattr(module, fn, None)):
      raise ValueError(f"experiment file {module.__file__} lacks {fn}(arg)")
  return Experiment(name=name, arg=arg, path=os.path.abspath(module.__file__), module=module)


def _import_experiment(name: str) -> ModuleType:
  if name not in names():
    raise ValueError(f"unknown experiment {name!r}: no module {EXPERIMENTS_PACKAGE}.{name} in {_package_dir()}; "
                     f"known experiments: {names()}")
  return _import_package_module(EXPERIMENTS_PACKAGE, name)


def _load_file(path: str, name: str) -> ModuleType:
  """An experiment file outside the package (`--experiment=/path/to/file.py`), loaded from its path."""
  if not os.path.exists(path):
    raise ValueError(f"unknown experiment {path!r}: no such file; known experiments: {names()}")
  module_name = "llmstages_experiment_" + "".join(c if c.isalnum() else "_" for c in name)
  if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == path:
    return sys.modules[module_name]
  spec = importlib.util.spec_from_file_location(module_name, path)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load {path}")
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module
