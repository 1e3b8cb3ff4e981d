"""The command line every script shares: flags, their defaults and checks, one-line errors."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch

import offload_skip

from .base import RESULTS_DIR, UsageError, default_cache_dir, first_line
from .dummy import SHAPES as DUMMY_SHAPES, is_dummy
from .models import DEFAULT_MODEL, EMBEDDED_MODELS, HEAD_QUANTS, QUANTS, model_kind
from .csvio import APPENDED, check_output, check_writable
from .workload import DEFAULT_PROMPT, VARIANTS

CUDA_DEFAULT_PREFETCH = 2
# Layers read ahead by the stream reader on CPU: none. Measured on the 2-core machine in
# results/diskoffload.csv: when a layer reads from the page cache in ~0.15 ms, a reader
# thread costs torch's two compute threads more than it hides; read-ahead pays when the
# storage is slow (--io-bandwidth), so ask for it there.
CPU_DEFAULT_PREFETCH = 0

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
SIZE_HELP = "K/M/G/T are decimal (x1000: 600M = 600,000,000), Ki/Mi/Gi/Ti binary (x1024); a trailing B is optional"


def parse_size(text: str) -> int:
    """Bytes from ``1234``, ``64M``, ``1.5G``, ``32MiB``: K/M/G/T are powers of 1000, as
    disk and link speeds are quoted; Ki/Mi/Gi/Ti powers of 1024. Raises ValueError."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"invalid size {text!r}: use a number with an optional suffix; {SIZE_HELP}")
    number, prefix, binary = match.groups()
    if binary and not prefix:
        raise ValueError(f"invalid size {text!r}: 'i' needs a prefix (Ki, Mi, Gi, Ti)")
    base = 1024 if binary else 1000
    return int(round(float(number) * base ** _SIZE_POWERS[prefix.lower()]))


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _rate_arg(text: str) -> int:
    rate = _size_arg(text)
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: must be > 0 bytes/s")
    return rate


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small (minimum {minimum})")
        return value
    return parse


def _prefetch_arg(text: str):
    return "auto" if text == "auto" else int_at_least(0)(text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # A None default is computed from other flags (the help text says how); a switch has none.
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, ``<prog>: error: <message>``, exit status 2: no usage dump, no traceback."""
        lines = str(message).strip().splitlines() or ["error"]
        self.exit(2, f"{self.prog}: error: {lines[0]}\n")


def new_parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    """An empty parser with this repo's conventions: defaults in the help, one-line errors."""
    return _Parser(prog=prog, description=description, formatter_class=_HelpFormatter)


def build_parser(variant: str | None = None, description: str | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    """The command line shared by every script.

    variant: the script's variant (``baseline``, ``kvcache``, ``diskoffload``); None for
    eval_ppl.py, which takes ``--variant`` and no decode-timing flags. The stream flags
    (--prefetch, --budget, --io-bandwidth; --no-kv-cache where something is decoded) are
    defined here once, for the scripts that can run the stream variant; --cpu-read for every
    script that patches (session residency reads layers too).
    """
    parser = new_parser(prog, description)
    # in this order: --help lists the flags as they are added
    for add_group in (_model_arguments, _timing_arguments, _ppl_arguments, _residency_arguments, _output_arguments):
        add_group(parser, variant)
    parser.set_defaults(script_variant=variant)
    return parser


def _model_arguments(parser: argparse.ArgumentParser, variant: str | None) -> None:
    """What runs: the model, its weight format and device, the layers offloaded and how."""
    add = parser.add_argument
    if variant is None:
        add("--variant", choices=VARIANTS, default="baseline",
            help="which model to score: unpatched, session residency, or stream residency")
    add("--model", default=DEFAULT_MODEL,
        help=f"embedded alias ({', '.join(EMBEDDED_MODELS)}), local checkpoint directory, hub id org/name, or "
             f"dummy:SHAPE|ALIAS|DIR (that shape with seeded random weights, for memory and speed only; "
             f"shapes: {', '.join(DUMMY_SHAPES)})")
    add("--quant", choices=QUANTS, default="nf4", help="weight format (nf4: bitsandbytes 4-bit, double quant)")
    add("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")
    add("--layers", default="even", metavar="PATTERN",
        help="decoder layers to offload: even, odd, every:K, or a list/ranges like 2,4,7 or 2-10")
    add("--alpha", type=float, default=1.0, help="residual weight of an offloaded layer (1 = the full model)")
    add("--skip", default=None, metavar="PATTERN",
        help="offloaded layers to remove outright (alpha 0: never read, never computed), "
             "as a list or pattern like --layers; the others keep --alpha")
    add("--inject-distance", type=int_at_least(1), default=1, metavar="K",
        help="add an offloaded layer's contribution before the K-th resident layer after it "
             "(1: the next one, exact at alpha 1)")
    add("--offload-embeddings", action="store_true",
        help="also keep the input embedding's weight on disk: each forward reads only the rows of its tokens "
             "(exact); an embedding tied to the output head stays resident (the head needs all of it)")
    add("--quant-head", choices=HEAD_QUANTS, default="none",
        help="output head format: none (as loaded) or nf4 (bitsandbytes 4-bit, a copy of its own: "
             "approximate, it changes the model's logits)")
    add("--device-budget", type=_size_arg, default=None, metavar="SIZE",
        help=f"fit the model to a device of SIZE bytes (6GiB, 6GB or bytes; {SIZE_HELP}): a plan chooses, from "
             "exact levers and rates probed on this machine (cached), which layers stay and stream, read-ahead, "
             "--cpu-read and the embedding's rows from disk, with the KV cache of the run reserved; it prints the "
             "plan and replaces --layers, --budget, --prefetch, --cpu-read and --offload-embeddings. Stream "
             "residency (run_diskoffload.py, eval_ppl.py --variant diskoffload)")
    add("--allow-host-compute", action="store_true",
        help="with --device-budget on a GPU, let the plan compute streamed layers on the host CPU from host memory "
             "instead of copying them (llama.cpp's -ngl): approximate, a CPU kernel rounds differently; bf16/fp32 "
             "layers only. On a CPU the identity")
    add("--cache-dir", type=Path, default=default_cache_dir(),
        help="converted embedded models go to <cache-dir>/hf, offloaded layer files to <cache-dir>/layers")


def _timing_arguments(parser: argparse.ArgumentParser, variant: str | None) -> None:
    """The timed greedy decoding (not for eval_ppl.py, variant None)."""
    add = parser.add_argument
    if variant is not None:
        add("--prompt", default=DEFAULT_PROMPT, help="prompt for the timed greedy decoding")
        add("--max-new-tokens", type=int_at_least(1), default=32,
            help="tokens decoded per timed run (the headline rows: 64, reproduce.sh)")
        add("--batch-size", type=int_at_least(1), default=1,
            help="sequences decoded together (--prompt and built-in prompts of other lengths, padded left); "
                 "tok/s then counts the tokens of every sequence")
        add("--warmup", type=int_at_least(0), default=1, help="untimed runs before the measured ones")
        add("--repeats", type=int_at_least(1), default=3, help="measured runs; the median is reported")


def _ppl_arguments(parser: argparse.ArgumentParser, variant: str | None) -> None:
    """The perplexity pass."""
    add = parser.add_argument
    add("--ppl-dataset", default=None, metavar="NAME|PATH",
        help="wikitext2, wiki-embedded, short (each text scored on its own) or a UTF-8 text file; "
             "default: wiki-embedded for an embedded alias or local directory, wikitext2 for a hub id")
    add("--ppl-ctx", type=int_at_least(2), default=512, help="tokens per perplexity window")
    add("--ppl-stride", type=int_at_least(1), default=None,
        help="tokens the window moves by (default: = ctx, non-overlapping); "
             "with overlap only the new tokens are scored")
    add("--ppl-max-tokens", type=int_at_least(0), default=2048,
        help="score the first N tokens of the corpus; 0 skips perplexity (the headline rows: 8192, reproduce.sh)")


def _residency_arguments(parser: argparse.ArgumentParser, variant: str | None) -> None:
    """How offloaded layers are read (every patching script) and streamed (diskoffload)."""
    if variant != "baseline":
        reads = parser.add_argument_group("offloaded layer reads (kvcache, diskoffload)")
        reads.add_argument("--cpu-read", choices=offload_skip.CPU_READS, default="map",
                           help="how a CPU brings an offloaded layer in: map (its tensors are views of a private "
                                "mapping of the layer file: no copy, the pages stay the page cache's) or copy (read "
                                "into a buffer of the layer's size); ignored on CUDA, which copies through pinned "
                                "staging")
    if variant in (None, "diskoffload"):
        stream = parser.add_argument_group("stream residency (diskoffload)")
        stream.add_argument("--prefetch", type=_prefetch_arg, default="auto", metavar="N|auto",
                            help=f"offloaded layers read ahead by a background thread (0: none); "
                                 f"auto = {CUDA_DEFAULT_PREFETCH} on CUDA, {CPU_DEFAULT_PREFETCH} on CPU")
        stream.add_argument("--budget", type=_size_arg, default=0, metavar="SIZE",
                            help=f"bytes of offloaded layers kept resident instead of streamed; {SIZE_HELP}")
        stream.add_argument("--cold", action="store_true",
                            help="drop each layer file from the page cache before reading it (posix_fadvise), "
                                 "so reads come from the storage device. On a CPU it needs --cpu-read copy "
                                 "(a mapped layer is read once and kept)")
        stream.add_argument("--io-bandwidth", type=_rate_arg, default=None, metavar="RATE",
                            help=f"throttle layer reads to RATE bytes/s to emulate slower storage, e.g. 600M; "
                                 f"{SIZE_HELP}; default: unthrottled. On a CPU it needs --cpu-read copy "
                                 "(a mapped layer is not read)")
        if variant is not None:  # perplexity never decodes
            stream.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                                help="recompute the whole sequence for every token (the original's slow variant)")


def _output_arguments(parser: argparse.ArgumentParser, variant: str | None) -> None:
    """Where the row goes, what the summary compares with, the seed."""
    add = parser.add_argument
    add("--out", type=Path, default=None,
        help="CSV file to append the row to (default: results/<variant>.csv, results/ppl.csv for eval_ppl)")
    add("--row-file", type=Path, default=None, metavar="CSV",
        help="write the row alone into this new CSV (a temporary name, renamed when whole) instead of appending "
             "it to --out; sweep.py gives each case one (results/<suite>.d/<case-id>.csv) and folds them into "
             "--out. Left out of the recorded command, so the row says how to rerun it")
    add("--baseline-csv", type=Path, default=None,
        help="CSV with the baseline rows whose perplexity the summary compares against "
             "(default: baseline.csv next to --out); speed and memory ratios come from this run itself")
    add("--seed", type=int, default=0,
        help="seed for torch/random/numpy (decoding is greedy, so only ties depend on it)")


def default_ppl_dataset(model: str) -> str:
    """wiki-embedded for what works offline (an embedded alias, a local directory), else wikitext2."""
    try:
        return "wikitext2" if model_kind(model) == "hub" else "wiki-embedded"
    except UsageError:
        return "wiki-embedded"  # open_run reports the unknown model first


def finish_args(args: argparse.Namespace, row_type=None, plans_drafts: bool = False) -> argparse.Namespace:
    """Fill the defaults that depend on other flags, and check what argparse cannot.
    row_type: the dataclass the script appends to --out (default: Result); plans_drafts: see
    check_device_budget."""
    args.variant = args.script_variant or args.variant
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if is_dummy(args.model) and args.ppl_max_tokens:
        if args.script_variant is None:  # eval_ppl.py: perplexity is all it measures
            raise UsageError(f"{args.model} has dummy weights: its perplexity means nothing, so eval_ppl.py "
                             "does not score it")
        print(f"{args.model}: dummy weights, so no perplexity (--ppl-max-tokens {args.ppl_max_tokens} ignored)",
              file=sys.stderr)
        args.ppl_max_tokens = 0
    if args.ppl_dataset is None:
        args.ppl_dataset = default_ppl_dataset(args.model)
    if args.ppl_stride is None:
        args.ppl_stride = args.ppl_ctx
    if args.ppl_stride > args.ppl_ctx:
        raise UsageError(f"--ppl-stride {args.ppl_stride} is larger than --ppl-ctx {args.ppl_ctx}: "
                         "tokens would go unscored")
    if args.offload_embeddings and args.variant == "baseline":
        raise UsageError("--offload-embeddings needs a patched variant (kvcache or diskoffload); "
                         "the baseline is the unpatched model")
    if not hasattr(args, "kv_cache"):
        args.kv_cache = True
    if args.device_budget is not None:
        check_device_budget(args, plans_drafts)
    elif args.allow_host_compute:
        raise UsageError("--allow-host-compute is a choice the plan may make: it needs --device-budget")
    if not hasattr(args, "prefetch"):  # scripts without the stream flags
        args.prefetch, args.budget, args.io_bandwidth, args.cold = None, None, None, False
    elif args.prefetch == "auto":
        args.prefetch = CUDA_DEFAULT_PREFETCH if args.device.startswith("cuda") else CPU_DEFAULT_PREFETCH
    if not hasattr(args, "cpu_read"):  # the baseline patches nothing
        args.cpu_read = None
    planned = args.layers == "plan"  # --device-budget: the plan chooses --cpu-read
    if args.io_bandwidth and args.cpu_read == "map" and args.device == "cpu" and args.variant == "diskoffload" \
            and not planned:
        raise UsageError("--io-bandwidth throttles layer reads, and with --cpu-read map (the default) a CPU maps "
                         "the layer files instead of reading them: add --cpu-read copy")
    if args.cold and args.cpu_read == "map" and args.device == "cpu" and args.variant == "diskoffload" and not planned:
        raise UsageError("--cold drops a layer file's pages before each read, and with --cpu-read map (the default) "
                         "a CPU maps each layer once and keeps it for the whole decode: add --cpu-read copy")
    if args.out is None:
        args.out = RESULTS_DIR / ("ppl.csv" if args.script_variant is None else f"{args.variant}.csv")
    if args.baseline_csv is None:
        args.baseline_csv = Path(args.out).parent / "baseline.csv"
    check_output(args.out, *(row_type,) if row_type else ())  # fail now, not after minutes of measuring
    if getattr(args, "row_file", None) is not None:
        check_writable(args.row_file)
    return args


# flags whose choice --device-budget makes: (flag, attribute, the default it must be left at)
PLANNED_FLAGS = (("--layers", "layers", "even"), ("--budget", "budget", 0), ("--prefetch", "prefetch", "auto"),
                 ("--offload-embeddings", "offload_embeddings", False), ("--alpha", "alpha", 1.0),
                 ("--skip", "skip", None), ("--inject-distance", "inject_distance", 1))


def check_device_budget(args: argparse.Namespace, plans_drafts: bool = False) -> None:
    """--device-budget plans stream residency from exact levers: it needs the stream variant and
    makes the choices of the flags in PLANNED_FLAGS, which must be left at their defaults.
    plans_drafts: the script weighs --draft in the plan (run_fit.py); elsewhere --draft is refused."""
    if args.variant != "diskoffload":
        raise UsageError(f"--device-budget plans stream residency, and the {args.variant} variant "
                         + ("is the unpatched model" if args.variant == "baseline" else
                            "holds every offloaded layer during an inference")
                         + ": use run_diskoffload.py (or eval_ppl.py --variant diskoffload)")
    if args.device_budget <= 0:
        raise UsageError("--device-budget must be more than 0 bytes")
    if getattr(args, "draft", "none") != "none" and not plans_drafts:
        raise UsageError("--device-budget weighs a draft in run_fit.py only; here run a draft by hand "
                         "(--layers, --budget): leave out --draft or --device-budget")
    for flag, name, default in PLANNED_FLAGS:
        if getattr(args, name, default) != default:
            raise UsageError(f"--device-budget makes the choice {flag} names (the plan uses exact levers only): "
                             f"leave out {flag}")
    args.layers = "plan"


def main(run: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
         argv: list[str] | None = None, finish=finish_args) -> int:
    """Parse argv, run ``run(finish(args))``; bad input becomes ``<prog>: error: <message>``,
    exit 2. finish=None for a parser that is not build_parser's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", parser.prog, *recorded_argv(argv)])
    APPENDED.clear()  # what this run appends and stores (a test may call several mains in one process)
    offload_skip.SYNCING.clear()
    try:
        run(finish(args) if finish else args)
    except (UsageError, offload_skip.CacheError) as err:
        parser.error(first_line(err))
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: {interrupted_line()}", file=sys.stderr)
        return 130  # as a shell reports a process that SIGINT ended
    return 0


def recorded_argv(argv: list[str]) -> list[str]:
    """argv without --row-file and its value: where one run put its row is not how to rerun it."""
    kept, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        if arg == "--row-file":
            argv[:1] = []
        elif not arg.startswith("--row-file="):
            kept.append(arg)
    return kept


def interrupted_line() -> str:
    """What a Ctrl-C left behind, in one line: the rows appended before it, and any layer
    folder caught mid-write (its manifest lists what was kept; the next run adds the rest)."""
    rows = f"rows appended to {', '.join(map(str, dict.fromkeys(APPENDED)))}" if APPENDED else "no row written"
    folders = [f"{p.done} of {p.total if p.total is not None else '?'} layer files kept in {folder}, the next run "
               "stores the rest" for folder, p in offload_skip.SYNCING.items()]
    return "; ".join(["interrupted", rows, *folders])


