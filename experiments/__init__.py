"""The named experiments, one module per experiment (see llmstages/experiments.py for what a module defines).

`python -m llmstages.sweep --list` finds them by listing this package; `--experiment=NAME` imports
`experiments.NAME`. Nothing in llmstages imports this package statically.
"""
