"""One script invocation: load what the arguments name (corpus, layer pattern, model, prompt)
and apply the variant's residency to the model."""
from __future__ import annotations

import argparse
import contextlib
import functools
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import offload_skip

from .base import UsageError, first_line
from .corpus import load_corpus
from .hostmem import AnonPeak
from .models import embeddings_tied, load_model, model_config, model_kind, quantize_head
from .workload import BATCH_PROMPTS, DEFAULT_PROMPT, VARIANT_MODES


@dataclass
class Run:
    """One script invocation: its arguments and what they loaded."""
    args: argparse.Namespace
    model: object
    tokenizer: object
    info: dict          # from load_model: model label, quant, device, load_s, n_layers
    layers: list[int]   # offloaded layer indices (the --layers pattern, resolved)
    skipped: list[int]  # of those, removed outright (--skip)
    docs: list[str] | None  # perplexity corpus (None: --ppl-max-tokens 0)
    ppl_dataset: str | None
    input_ids: torch.Tensor  # the prompts, [batch, n] on the device
    attention_mask: torch.Tensor | None = None  # a left-padded batch's real tokens (None: no padding)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def variant(self) -> str:
        return self.args.variant

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


def _config_layers(name: str, cache_dir: Path) -> int:
    """The decoder layer count from the config alone (cheap), to reject a pattern before loading."""
    return model_config(name, cache_dir).get_text_config().num_hidden_layers


def select(pattern: str, n_layers: int, flag: str = "--layers") -> list[int]:
    """offload_skip.select_layers, with a bad pattern as a UsageError."""
    try:
        return offload_skip.select_layers(n_layers, pattern)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None


def select_skipped(pattern: str | None, offloaded: list[int], n_layers: int) -> list[int]:
    """The --skip layers: none, or offloaded layers only (a resident layer cannot be removed here)."""
    if not pattern:
        return []
    skipped = select(pattern, n_layers, "--skip")
    stray = sorted(set(skipped) - set(offloaded))
    if stray:
        raise UsageError(f"--skip: layers {' '.join(map(str, stray))} are not offloaded (--layers {offloaded})")
    return skipped


def open_run(args: argparse.Namespace, whole: bool = False) -> Run:
    """Check the cheap things first, the first cause first (the model: an offline hub id not in the
    local cache fails at once; its layer pattern; then the corpus, only if perplexity is asked
    for), then load the model and prompt.

    A patched variant stores its offloaded layers one at a time before loading the rest (they
    never sit on the device together, nor beside the rest), so a model larger than the device
    loads; whole=True loads every layer (for a script that also runs the unpatched model as loaded)."""
    from transformers import set_seed

    set_seed(args.seed)
    model_kind(args.model)
    n_layers = _config_layers(args.model, args.cache_dir)
    # --device-budget: every layer stored, the plan's resident ones kept (bench.planning)
    layers = list(range(n_layers)) if args.layers == "plan" else select(args.layers, n_layers)
    skipped = select_skipped(getattr(args, "skip", None), layers, n_layers)
    docs, ppl_dataset = load_corpus(args.ppl_dataset, args.cache_dir) if args.ppl_max_tokens else (None, None)
    streamed = not whole and VARIANT_MODES[args.variant] != "resident"
    with AnonPeak() as host_peak:
        model, tokenizer, info = load_model(args.model, args.quant, args.device, args.cache_dir,
                                            offloaded=layers if streamed else None, layers_dir=layers_dir(args))
    info["load_peak_host_bytes"] = host_peak.bytes
    # read before --quant-head, whose bf16 copy of the head is no part of loading
    info["load_peak_bytes"] = load_peak_bytes(torch.device(args.device), info["loaded_bytes"])
    info["tied_embeddings"] = embeddings_tied(model)  # as the checkpoint has it, before --quant-head
    quantize_head(model, getattr(args, "quant_head", "none"))
    input_ids, mask = prompt_batch(tokenizer, getattr(args, "prompt", DEFAULT_PROMPT), getattr(args, "batch_size", 1))
    return Run(args, model, tokenizer, info, layers, skipped, docs, ppl_dataset, input_ids.to(args.device),
               None if mask is None else mask.to(args.device))


def prompt_batch(tokenizer, prompt: str, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [batch, n], attention_mask or None): the prompt alone, or the prompt and the
    first batch_size - 1 of BATCH_PROMPTS (cycling), padded left."""
    if not tokenizer(prompt).input_ids:
        raise UsageError("--prompt gives no tokens")
    if batch_size == 1:
        return tokenizer(prompt, return_tensors="pt").input_ids, None
    prompts = [prompt] + [BATCH_PROMPTS[k % len(BATCH_PROMPTS)] for k in range(batch_size - 1)]
    if tokenizer.pad_token is None:  # padded positions are masked: any id will do
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return batch.input_ids, batch.attention_mask


def patch(run: Run):
    """Apply the run's variant to its model in place: None for the baseline, else the
    offload_skip controller (session residency for kvcache, stream for diskoffload), its
    layers mapped or copied on a CPU as --cpu-read says. Updates
    ``run.info["load_peak_bytes"]`` (open_run's) to include patching."""
    mode = VARIANT_MODES[run.variant]
    if mode == "resident":
        return None
    args = run.args
    stream = {}
    if mode == "stream":
        stream = dict(prefetch=args.prefetch, budget_bytes=args.budget, io_bandwidth=args.io_bandwidth,
                      cold=args.cold)
    if run.device.type == "cuda":  # patching's own peak, from here: not --quant-head's
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        alpha = {i: 0.0 if i in run.skipped else args.alpha for i in run.layers}
        ctl = offload_skip.patch_model(run.model, run.layers, layers_dir(args), alpha=alpha,
                                       mode=mode, inject_distance=args.inject_distance,
                                       offload_embeddings=getattr(args, "offload_embeddings", False),
                                       store=run.info["store"], cpu_read=getattr(args, "cpu_read", None) or "map",
                                       **stream)
    except ValueError as err:  # e.g. a pattern that names tied tensors
        raise UsageError(str(err)) from None
    # the larger of loading's peak (open_run's) and patching's; on CPU storing's peak is in ctl's
    run.info["load_peak_bytes"] = max(run.info["load_peak_bytes"], load_peak_bytes(run.device, ctl.load_peak_bytes))
    return ctl


def layers_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) / "layers"


def load_peak_bytes(device: torch.device, weight_bytes: int) -> int:
    """CUDA: the allocator's peak since its last reset (load_model's, or patch's); CPU: the
    weight accounting's peak, `weight_bytes`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return weight_bytes


def inference(ctl) -> Callable[[], contextlib.AbstractContextManager]:
    """What one measured inference runs inside: a session (all offloaded layers loaded on
    entry) for session mode; for stream mode a block that ends in standby(), so every run
    starts from the idle state; nothing for the baseline. Cached memory is kept between
    inferences (standby(release=False)): no timed run pays for allocator calls the previous
    one already made; measure_memory releases it before measuring the idle state."""
    if ctl is None:
        return contextlib.nullcontext
    if ctl.mode == "session":
        return functools.partial(ctl.session, release=False)

    @contextlib.contextmanager
    def stream():
        try:
            yield ctl
        finally:
            ctl.standby(release=False)
    return stream


