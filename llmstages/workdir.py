"""SHIM (drop at merge): core's branch creates the real module; this re-exports today's train.py functions."""

from llmstages.train import (final_head_dir, final_lora_dir, final_marker, final_params_dir,  # noqa: F401
                             load_final_lora, load_final_params, save_final_lora, save_final_params, stage_finished)
