"""The shipped configs, one `get_config(arg)` per file: `--config=configs/NAME.py:ARG` loads one by path, and
`from configs import NAME` (experiments/, tests) imports it as a module of this package."""
