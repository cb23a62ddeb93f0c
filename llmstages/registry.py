"""The one registry: names a config can use, by category (stage, evaluator, reward, source).

A module registers what it defines with a decorator, and the package that owns a category imports its modules,
so the registry never imports anything above it (Tunix's `function_registry`, big_vision's name -> function):

    @registry.register("reward", "arith")
    def arith(completion, prompt): ...

    registry.get("reward", "arith", where="config.grpo.rewards")  # unknown names list the known ones
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

CATEGORIES = ("stage", "evaluator", "reward", "source")

_TABLES: dict[str, dict[str, Any]] = {category: {} for category in CATEGORIES}

T = TypeVar("T")


def _table(category: str) -> dict[str, Any]:
  if category not in _TABLES:
    raise ValueError(f"unknown registry category {category!r}; categories: {list(CATEGORIES)}")
  return _TABLES[category]


def add(category: str, name: str, obj: Any) -> None:
  """Registers `obj` under `name`; a name registered twice in one category is an error."""
  table = _table(category)
  if name in table:
    raise ValueError(f"{category} {name!r} is registered twice")
  table[name] = obj


def register(category: str, name: str) -> Callable[[T], T]:
  """Decorator form of `add`: returns the object unchanged."""
  def wrap(obj: T) -> T:
    add(category, name, obj)
    return obj
  return wrap


def get(category: str, name: str, where: str = "") -> Any:
  """The object registered as `name`; `where` names the config key or flag that asked for it."""
  table = _table(category)
  if name not in table:
    at = f" (at {where})" if where else ""
    raise ValueError(f"unknown {category} {name!r}{at}; known: {sorted(table)}")
  return table[name]


def names(category: str) -> list[str]:
  return sorted(_table(category))
