"""The study's sweeps: named suites of cases, each case one command line of eval_ppl.py (or,
for ``beyond`` and ``load``, of the run_*.py scripts), so that any row is reproduced by one
command. Each suite appends to results/<suite>.csv.

    python sweep.py alpha               # run the cases not yet in results/alpha.csv
    python sweep.py planner --dry-run   # print one command per case (for a SLURM array, GNU parallel)
    python sweep.py --list              # the suites and their case counts

Resumable: a case whose exact command line is already in its suite's CSV (the `command`
column every row carries) is skipped. Suites: alpha, patterns, importance, planner,
distance, context, beyond, load, cpu_read, speculative, fit (run_fit.py: the device-budget plan
against a grid). The planner's cases depend on the importance suite's rows: run
``importance`` first.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import bench
import offload_skip
from bench import importance, launch

# The study's models, all fp32: exact and fast on a CPU without AVX512-BF16, where NF4 has no
# fused kernel (a 512-token NF4 forward of the 0.5B takes ~27 s here, fp32 ~5 s). tokens:
# --ppl-max-tokens, chosen so that each suite runs in minutes on the 2-core CPU; every case of
# a suite scores the same tokens of a model, so its rows compare with each other.
STUDY_MODELS = {
    "smollm2-135m": dict(n_layers=30, tokens=2048),        # Llama
    "qwen2.5-coder-0.5b": dict(n_layers=24, tokens=1024),  # Qwen2, the original's architecture
}
HEADLINE_MODELS = {"qwen2.5-coder-1.5b": dict(n_layers=28, tokens=1024)}
CHEAP_MODELS = {"gemma3-270m": dict(n_layers=18, tokens=2048)}  # Gemma 3: the alpha suite only
QUANT = "fp32"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
HEADLINE_ALPHAS = (0.0, 0.5, 1.0)
BLOCK_SIZES = (2, 3, 4)
DISTANCES = (1, 2, 3)
CONTEXTS = (128, 256, 512, 1024, 2048)
CONTEXT_TOKENS = 2048  # enough for one full window at the longest context
CONTEXT_PATTERN = "blocks:2"  # the parallel-residual pattern of the context suite
PLANNER_POINTS = 4  # skip 0, n/4, n/2, 3n/4, n of the n offloaded layers
# beyond: past the layers (input-embedding rows from disk, an NF4 output head), in the mission's
# format, NF4, timed and scored: one row per model and step. NF4 decodes slowly on this CPU
# (no fused kernel), so the 1.5B decodes and scores fewer tokens.
BEYOND_MODELS = {
    "smollm2-135m": dict(tokens=1024, new_tokens=16),
    "gemma3-270m": dict(tokens=1024, new_tokens=16),
    "qwen2.5-coder-0.5b": dict(tokens=1024, new_tokens=16),
    "qwen2.5-coder-1.5b": dict(tokens=512, new_tokens=8),
}
BEYOND_STEPS = (  # unpatched, layers offloaded, + embedding rows from disk, + NF4 output head, streamed
    ("run_baseline.py",),
    ("run_kvcache.py",),
    ("run_kvcache.py", "--offload-embeddings"),
    ("run_kvcache.py", "--offload-embeddings", "--quant-head", "nf4"),
    ("run_diskoffload.py", "--offload-embeddings", "--quant-head", "nf4"),  # the peak stays low too
)
BEYOND_REPEATS = 2
# load: the load path of a model larger than the device. Patched variants load their offloaded
# layers from the checkpoint one at a time (load_peak_bytes); the baseline loads everything.
LOAD_MODEL = "qwen2.5-coder-1.5b"
LOAD_SCRIPTS = ("run_baseline.py", "run_kvcache.py", "run_diskoffload.py")
# cpu_read: a streamed layer on a CPU as views of its mapped file against a copy into a slot
# (--cpu-read map|copy), each timed against the resident model in its own run, interleaved; batch
# 1 and 16, the read-ahead advice (prefetch 1), NF4 and bf16.
CPU_READ_CASES = (  # (model, quant, batch size, prefetch)
    ("smollm2-135m", "nf4", 1, 0), ("smollm2-135m", "bf16", 1, 0),
    ("qwen2.5-coder-0.5b", "nf4", 1, 0), ("qwen2.5-coder-0.5b", "bf16", 1, 0),
    ("smollm2-135m", "nf4", 16, 0), ("smollm2-135m", "nf4", 1, 1),
)
CPU_READ_REPEATS = 11  # batch-1 ratios moved by up to 0.1 between 5-repeat runs of one design
# speculative: Qwen2.5-Coder-1.5B with its even layers streamed, decoding speculatively with each
# draft (the 0.5B sibling, self substitutes, prompt lookup) against plain stream decoding and the
# resident model; code (HumanEval) and wiki prompts; from the page cache, then cold: every read
# from the device (a copy per read: mapped pages would stay in memory for the whole decode),
# without and with read-ahead, which keeps reading while the draft proposes.
SPECULATIVE_MODEL = "qwen2.5-coder-1.5b"
SPECULATIVE_DRAFTS = {"bf16": ("qwen2.5-coder-0.5b", "self:nf4", "lookup"), "nf4": ("qwen2.5-coder-0.5b", "lookup")}
SPECULATIVE_READS = {"page cache": ("--prefetch", "0"), "cold": ("--cold", "--cpu-read", "copy", "--prefetch", "0"),
                     "cold, read-ahead": ("--cold", "--cpu-read", "copy", "--prefetch", "2")}
SPECULATIVE_COLD = {"bf16": ("qwen2.5-coder-0.5b", "self:nf4", "lookup"), "nf4": ("qwen2.5-coder-0.5b",)}
# self drafts below 4 bits (HQQ): the second width for the bf16 target, the only ones for NF4; code prompts
SPECULATIVE_LOW_BITS = {"bf16": ("self:hqq2",), "nf4": ("self:hqq3", "self:hqq2")}
# fp32, where a verify forward's rounding is too fine to flip a token: the sibling draft, code prompts
SPECULATIVE_FP32 = ("qwen2.5-coder-0.5b",)
SPECULATIVE_PROMPTS = 3
SPECULATIVE_TOKENS = 32
# fit: offload_skip.plan's configuration against a grid of hand ones (run_fit.py), each case one
# model, format, device budget (a share of the model's bytes) and read source, its configurations
# timed in interleaved rounds in one process: real weights at shares of their bytes, from the page
# cache and cold; the dummy 7B/14B NF4 shapes at a 6 GiB device.
FIT_SHARES = (0.25, 0.5, 0.75)
FIT_READS = {"page cache": (), "cold": ("--cold",)}
FIT_MODELS = (("smollm2-135m", "bf16"), ("smollm2-135m", "nf4"), ("qwen2.5-coder-1.5b", "bf16"),
              ("qwen2.5-coder-1.5b", "nf4"))
FIT_DUMMIES = (("dummy:qwen2.5-7b", "nf4"), ("dummy:qwen2.5-14b", "nf4"))
FIT_DEVICE_BYTES = "6GiB"
# drafts weighed (run_fit.py --draft) at half the model's bytes, on a code prompt whose repeats prompt
# lookup can find (its usual case: code and edits); the 0.5B sibling has the 1.5B's tokenizer
FIT_DRAFTS = (("smollm2-135m", "bf16", "lookup"), ("qwen2.5-coder-1.5b", "bf16", "lookup"),
              ("qwen2.5-coder-1.5b", "bf16", "qwen2.5-coder-0.5b"))
FIT_DRAFT_SHARE = 0.5
FIT_CODE_PROMPT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
FIT_ROUNDS = 4
FIT_TOKENS = 24
LOCAL_WORKERS = 2  # --launcher local's processes: this machine's 2 cores
SUITES = ("alpha", "patterns", "importance", "planner", "distance", "context", "beyond", "load", "cpu_read", "speculative",
          "fit")


Case = launch.Case  # one command line: the script and its arguments, --out among them


def _alpha(value: float) -> str:
    return f"{value:.6g}"


def _ppl_case(suite: str, out: Path, model: str, tokens: int, *flags: str) -> Case:
    return Case(suite, ("eval_ppl.py", "--model", model, "--quant", QUANT, "--ppl-max-tokens", str(tokens),
                        *flags, "--out", str(out)))


def half_band(n_layers: int) -> tuple[str, str]:
    """The even layers of the first and of the second half of the offload band, as lists."""
    even = offload_skip.select_layers(n_layers, "even")
    half = len(even) // 2
    return ",".join(map(str, even[:half])), ",".join(map(str, even[half:]))


def suite_cases(suite: str, out: Path, importances: dict | None = None) -> list[Case]:
    """The cases of a suite, in run order. out: the suite's CSV. importances: for the planner,
    {model: {"removal": {layer: ppl}, "block-influence": {layer: score}}} (planner_importances)."""
    if suite == "load":
        # what is measured is the load and the perplexity (exactness); the decode is kept short
        return [Case(suite, (script, "--model", LOAD_MODEL, "--quant", "nf4", "--max-new-tokens", "4",
                             "--warmup", "0", "--repeats", "1", "--ppl-max-tokens", "512", "--out", str(out)))
                for script in LOAD_SCRIPTS]
    if suite == "cpu_read":
        return [Case(suite, ("run_diskoffload.py", "--model", model, "--quant", quant, "--batch-size", str(batch),
                             "--prefetch", str(prefetch), "--cpu-read", way, "--max-new-tokens", "32",
                             "--repeats", str(CPU_READ_REPEATS), "--ppl-max-tokens", "0", "--out", str(out)))
                for model, quant, batch, prefetch in CPU_READ_CASES for way in ("copy", "map")]
    if suite == "speculative":
        def spec(quant, draft, reads, kind, schedule):
            return Case(suite, ("run_diskoffload.py", "--model", SPECULATIVE_MODEL, "--quant", quant, "--draft", draft,
                                "--draft-schedule", schedule, "--prompts", kind, "--prompt-count",
                                str(SPECULATIVE_PROMPTS), "--max-new-tokens", str(SPECULATIVE_TOKENS), "--repeats", "1",
                                "--ppl-max-tokens", "0", *SPECULATIVE_READS[reads], "--out", str(out)))
        # the default (adaptive) schedule where a draft can cost more than it saves: the page cache
        cases = [spec(quant, draft, "page cache", kind, "adaptive") for quant, drafts in SPECULATIVE_DRAFTS.items()
                 for draft in drafts for kind in ("code", "wiki")]
        cases += [spec(quant, draft, "page cache", "code", "adaptive") for quant, drafts in SPECULATIVE_LOW_BITS.items()
                  for draft in drafts]
        # every draft asked at every verify (transformers' schedule): what each draft does when used
        cases += [spec(quant, draft, "page cache", kind, "constant") for quant, drafts in SPECULATIVE_DRAFTS.items()
                  for draft in drafts for kind in ("code", "wiki")]
        cases += [spec(quant, draft, reads, "code", "constant") for reads in ("cold", "cold, read-ahead")
                  for quant, drafts in SPECULATIVE_COLD.items() for draft in drafts
                  if reads == "cold" or draft != "lookup"]
        cases += [spec(quant, draft, "page cache", "code", "constant") for quant, drafts in SPECULATIVE_LOW_BITS.items()
                  for draft in drafts]
        cases += [spec("fp32", draft, "page cache", "code", "constant") for draft in SPECULATIVE_FP32]
        return cases
    if suite == "fit":
        def fit(model, quant, budget, reads):
            return Case(suite, ("run_fit.py", "--model", model, "--quant", quant, *budget, *FIT_READS[reads],
                                "--rounds", str(FIT_ROUNDS), "--max-new-tokens", str(FIT_TOKENS), "--out", str(out)))
        cases = [fit(model, quant, ("--budget-share", str(share)), reads) for model, quant in FIT_MODELS
                 for reads in FIT_READS for share in FIT_SHARES]
        cases += [fit(model, quant, ("--device-budget", FIT_DEVICE_BYTES), reads) for model, quant in FIT_DUMMIES
                  for reads in FIT_READS]
        return cases + [fit(model, quant, ("--budget-share", str(FIT_DRAFT_SHARE), "--draft", draft, "--prompt",
                                           FIT_CODE_PROMPT), reads)
                        for model, quant, draft in FIT_DRAFTS for reads in FIT_READS]
    if suite == "beyond":
        return [Case(suite, (script, "--model", model, "--quant", "nf4", "--max-new-tokens", str(spec["new_tokens"]),
                             "--repeats", str(BEYOND_REPEATS), "--ppl-max-tokens", str(spec["tokens"]), *flags,
                             "--out", str(out)))
                for model, spec in BEYOND_MODELS.items() for script, *flags in BEYOND_STEPS]
    cases = []
    for model, spec in STUDY_MODELS.items():
        n, tokens = spec["n_layers"], spec["tokens"]

        def case(*flags, tokens=tokens):
            return _ppl_case(suite, out, model, tokens, *flags)

        if suite == "alpha":
            cases.append(case("--variant", "baseline"))
            cases += [case("--variant", "kvcache", "--alpha", _alpha(a)) for a in ALPHAS]
        elif suite == "patterns":
            first, second = half_band(n)
            cases += [case("--variant", "kvcache", "--layers", p) for p in ("even", "odd", "every:3", first, second)]
            for size in BLOCK_SIZES:
                cases += [case("--variant", "kvcache", "--layers", f"blocks:{size}", "--alpha", _alpha(a))
                          for a in (1.0, 1 / size)]
        elif suite == "importance":
            cases.append(case("--variant", "baseline", "--block-influence", "--influence-out",
                              str(out.parent / "block_influence.csv")))
            cases += [case("--variant", "kvcache", "--layers", str(i), "--alpha", "0") for i in range(n)]
        elif suite == "planner":
            offloaded = offload_skip.select_layers(n, "even")
            scores = (importances or {}).get(model)
            if not scores:
                raise bench.UsageError(f"planner: no importance rows for {model} in {out.parent}; "
                                       "run: python sweep.py importance")
            try:
                points = planner_points(offloaded, scores)
            except ValueError as err:  # an importance suite that has not finished
                raise bench.UsageError(f"planner: {model}: {err}; run: python sweep.py importance") from None
            for point in points:
                skip = ("--skip", ",".join(map(str, point.skipped))) if point.skipped else ()
                cases.append(case("--variant", "diskoffload", "--prefetch", "0", *skip))
        elif suite == "distance":
            cases += [case("--variant", "kvcache", "--inject-distance", str(k), "--alpha", _alpha(a))
                      for a in (1.0, 0.5) for k in DISTANCES]
        elif suite == "context":
            for ctx in CONTEXTS:
                flags = ("--ppl-ctx", str(ctx))
                cases += [case("--variant", "baseline", *flags, tokens=CONTEXT_TOKENS),
                          case("--variant", "kvcache", "--alpha", "0.5", *flags, tokens=CONTEXT_TOKENS),
                          case("--variant", "kvcache", "--layers", CONTEXT_PATTERN, *flags, tokens=CONTEXT_TOKENS)]
        else:
            raise bench.UsageError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if suite == "alpha":
        for model, spec in HEADLINE_MODELS.items():
            cases += [_ppl_case(suite, out, model, spec["tokens"], "--variant", "kvcache", "--alpha", _alpha(a))
                      for a in HEADLINE_ALPHAS]
        for model, spec in CHEAP_MODELS.items():
            cases.append(_ppl_case(suite, out, model, spec["tokens"], "--variant", "baseline"))
            cases += [_ppl_case(suite, out, model, spec["tokens"], "--variant", "kvcache", "--alpha", _alpha(a))
                      for a in ALPHAS]
    return _unique(cases)


def _unique(cases: list[Case]) -> list[Case]:
    """One case per command (two planner orders can skip the same layers)."""
    seen, out = set(), []
    for case in cases:
        if case.command not in seen:
            seen.add(case.command)
            out.append(case)
    return out


def planner_points(offloaded: list[int], scores: dict) -> list[importance.PlanPoint]:
    """Every order's curve: by each importance score, least important skipped first, and the naive orders."""
    orders = {name: importance.skip_order(offloaded, "importance", by_layer) for name, by_layer in scores.items()}
    orders.update({name: importance.skip_order(offloaded, name) for name in importance.NAIVE_ORDERS})
    return importance.plan(offloaded, orders, importance.skip_counts(len(offloaded), PLANNER_POINTS))


def planner_importances(results_dir: Path) -> dict:
    """{model: {"removal": {layer: PPL with that layer removed}, "block-influence": {layer: BI}}}
    from the importance suite's rows (the latest row per layer wins)."""
    scores: dict = {}
    for row in bench.read_rows(Path(results_dir) / "importance.csv"):
        if row["variant"] != "baseline" and row["alpha"] and float(row["alpha"]) == 0 and row["ppl"]:
            layers = row["layers_offloaded"].split()
            if len(layers) == 1:
                scores.setdefault(row["model"], {}).setdefault("removal", {})[int(layers[0])] = float(row["ppl"])
    for row in bench.read_rows(Path(results_dir) / "block_influence.csv"):
        scores.setdefault(row["model"], {}).setdefault("block-influence", {})[int(row["layer"])] = \
            float(row["block_influence"])
    return {model: s for model, s in scores.items() if len(s) == 2}


pending = launch.pending  # the cases without a row in their CSV or a row file waiting beside it


def merge_results(results: Path) -> list[tuple[Path, int]]:
    """Fold every row folder under `results` (<name>.d) into its CSV: a suite's rows in case
    order, any other rows by file name. [(csv, rows added)], for the folders there were."""
    merged = []
    for folder in sorted(Path(results).glob("*.d")):
        out = folder.with_name(folder.name[:-2] + ".csv")
        try:
            cases = suite_cases(out.stem, out, planner_importances(results)) if out.stem in SUITES else []
        except bench.UsageError:  # a planner without its importance rows: no case order to keep
            cases = []
        # launch.merge keeps the case order and adds the files of no case after them, by name
        added = launch.merge(cases) if cases else bench.merge_row_files(out, bench.row_files(out))
        merged.append((out, added))
    return merged


def _relative(path: Path) -> Path:
    """Paths under the repo as relative ones, so the recorded commands run from any clone;
    others absolute, since the cases run from the repo."""
    path = Path(path).resolve()
    try:
        return path.relative_to(bench.REPO_DIR)
    except ValueError:
        return path


def build_parser() -> argparse.ArgumentParser:
    parser = bench.new_parser("sweep.py", __doc__.split("\n\n")[0])
    add = parser.add_argument
    add("suite", nargs="?", choices=SUITES, help="the suite to run")
    add("--cases", type=Path, metavar="FILE",
        help="a suite of your own instead: one command line per line, as --dry-run prints them (blank lines and "
             "# comments skipped), run from the repo; each row goes to its command's --out")
    add("--dry-run", action="store_true", help="print the pending cases' commands, run nothing")
    add("--all", action="store_true", help="with --dry-run: every case, finished ones too")
    add("--results", type=Path, default=bench.RESULTS_DIR, help="directory of the suite CSVs (results/<suite>.csv)")
    add("--merge", action="store_true",
        help="fold the rows the cases wrote (results/<suite>.d/<case-id>.csv) into results/<suite>.csv, in case "
             "order, and exit (report.py does it too); merging again changes nothing")
    add("--list", action="store_true", help="list the suites with their case counts and exit")
    where = parser.add_argument_group("where the cases run (default: here, one after another)")
    where.add_argument("--launcher", choices=("local", "submitit"), default=None,
                       help="local: --array-parallelism worker processes on this machine (submitit's local "
                            "executor; waits, then merges); submitit: one SLURM job array, a task per pending case "
                            "(returns at once: --merge when it has finished). Both need submitit (pip install "
                            "submitit)")
    where.add_argument("--array-index", type=bench.int_at_least(0), default=None, metavar="I",
                       help="run only slice I of --array-count slices (every N-th case from I), for an sbatch "
                            "--array script of your own: $SLURM_ARRAY_TASK_ID; the rows wait for --merge")
    where.add_argument("--array-count", type=bench.int_at_least(1), default=None, metavar="N",
                       help="slices in all: $SLURM_ARRAY_TASK_COUNT")
    where.add_argument("--array-parallelism", type=bench.int_at_least(1), default=None, metavar="N",
                       help="cases at once: SLURM's array limit (submitit's default, 256), or local workers "
                            f"(default {LOCAL_WORKERS}). Parallel cases share the machine: timed rows come out busy")
    where.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    where.add_argument("--time", type=bench.int_at_least(1), default=None, metavar="MIN",
                       help="minutes per SLURM task (submitit's default, 5) or per local worker (default: no limit)")
    where.add_argument("--gpus-per-task", type=bench.int_at_least(0), default=None, metavar="N",
                       help="GPUs per SLURM task (submitit's default: none)")
    where.add_argument("--log-folder", type=Path, default=Path("sweep-logs/%j"),
                       help="where submitit keeps each job's logs (and the job, pickled); %%j is the job id")
    return parser


def read_cases(path: Path) -> list[Case]:
    """A suite of one's own (--cases): one `python <script> <args>` line per case."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise bench.UsageError(f"cannot read --cases {path}: {err}") from None
    cases = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            argv = shlex.split(line)
        except ValueError as err:
            raise bench.UsageError(f"{path}:{number}: {err}") from None
        if len(argv) < 2 or argv[0] != "python":
            raise bench.UsageError(f"{path}:{number}: a case is a line 'python <script> <arguments>', not {line!r}")
        case = Case(Path(path).stem, tuple(argv[1:]))
        case.out  # noqa: B018 -- a case without --out is refused now, not after the others ran
        cases.append(case)
    return _unique(cases)


def _suite(args) -> tuple[str, list[Case], list[str]]:
    """The suite's name, its cases, and the sweep.py arguments that name it (for a worker)."""
    if args.cases is not None:
        if args.suite:
            raise bench.UsageError("name a suite or give --cases, not both")
        return args.cases.stem, read_cases(args.cases), ["--cases", str(args.cases.resolve())]
    if not args.suite:
        raise bench.UsageError("name a suite (or --cases FILE, or --list)")
    results = _relative(args.results)
    out = results / f"{args.suite}.csv"
    cases = suite_cases(args.suite, out, planner_importances(args.results) if args.suite == "planner" else None)
    return args.suite, cases, [args.suite, "--results", str(Path(args.results).resolve())]


def _check_flags(args) -> None:
    if (args.array_index is None) != (args.array_count is None):
        raise bench.UsageError("--array-index and --array-count go together")
    if args.array_index is not None and args.launcher:
        raise bench.UsageError("--array-index runs one slice here; --launcher launches them all: choose one")
    if args.all and not args.dry_run:
        raise bench.UsageError("--all goes with --dry-run (a finished case is not run again)")
    slurm_only = [flag for flag, value in (("--partition", args.partition), ("--gpus-per-task", args.gpus_per_task))
                  if value is not None]
    if slurm_only and args.launcher != "submitit":
        raise bench.UsageError(f"{slurm_only[0]} is a SLURM setting: it goes with --launcher submitit")


def run(args) -> int:
    if args.list:
        results = _relative(args.results)
        for suite in SUITES:
            out = results / f"{suite}.csv"
            try:
                cases = suite_cases(suite, out, planner_importances(args.results))
                print(f"{suite:<11} {len(cases):>3} cases, {len(pending(cases)):>3} pending")
            except bench.UsageError as err:
                print(f"{suite:<11} {bench.first_line(err)}")
        return 0
    _check_flags(args)
    name, cases, naming = _suite(args)
    if args.merge:
        added = launch.merge(cases)
        print(f"{name}: {added} row(s) merged into {', '.join(map(str, dict.fromkeys(c.out for c in cases)))}")
        return 0
    waiting = pending(cases)
    todo = cases if args.all else waiting
    if args.array_index is not None:
        mine = set(launch.array_slice(cases, args.array_index, args.array_count))
        todo = [case for case in todo if case in mine]
    if args.dry_run:
        for case in todo:
            print(case.command)
        if not todo:  # say so, rather than print nothing
            print(f"nothing pending ({len(cases)} cases done; --all lists them)")
        return 0
    part = f" (slice {args.array_index} of {args.array_count})" if args.array_index is not None else ""
    print(f"{name}: {len(cases)} cases, {len(cases) - len(waiting)} done, {len(todo)} to run{part}")
    if not todo:
        return 0
    if args.launcher == "submitit":
        jobs = launch.launch_slurm(todo, args.log_folder, f"sweep-{name}", args.partition, args.time,
                                   args.gpus_per_task, args.array_parallelism)
        print(f"submitted {len(jobs)} case(s) as SLURM job array {jobs[0].job_id.split('_')[0]}, logs in "
              f"{jobs[0].paths.folder}; when it has finished: python sweep.py {shlex.join(naming)} --merge")
        return 0
    if args.launcher == "local":
        failures = launch.launch_local(cases, todo, lambda i, n: [*naming, "--array-index", str(i),
                                                                  "--array-count", str(n)],
                                       args.array_parallelism or LOCAL_WORKERS, args.log_folder, args.time)
        failed = [(f.case, f" (log: {f.log})") for f in failures]
    else:
        alone = args.array_index is None  # an array task leaves the merge to whoever launched the array
        failed = [(case, "") for case in launch.run_serially(todo, merged=cases if alone else None)]
    if failed:
        print(f"{len(failed)} case(s) failed; rerun `python sweep.py {shlex.join(naming)}` to retry them:",
              file=sys.stderr)
        for case, log in failed:
            print(f"  {case.command}{log}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except bench.UsageError as err:
        parser.error(bench.first_line(err))
    except KeyboardInterrupt:  # the case running got the same Ctrl-C and said what it kept
        print("\nsweep.py: interrupted; the finished cases' rows are kept: rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
