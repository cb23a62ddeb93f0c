"""The one registry: categories, duplicates and unknown names fail with a message that says what is known."""

import pytest

from llmstages import registry


def test_register_get_names():
  @registry.register("reward", "test_registry_only")
  def fn(completion, prompt):
    return 1.0
  try:
    assert registry.get("reward", "test_registry_only") is fn
    assert "test_registry_only" in registry.names("reward")
    with pytest.raises(ValueError, match="registered twice"):
      registry.add("reward", "test_registry_only", fn)
  finally:
    registry._TABLES["reward"].pop("test_registry_only")


def test_unknown_name_and_category():
  with pytest.raises(ValueError, match=r"unknown stage 'nope' \(at config.stages\); known:"):
    registry.get("stage", "nope", where="config.stages")
  with pytest.raises(ValueError, match="unknown registry category 'widget'"):
    registry.names("widget")
