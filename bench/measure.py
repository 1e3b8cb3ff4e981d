"""Timing and memory: one greedy decode loop for every variant, ``model.generate`` for
like-with-like ratios, medians over repeats, and the idle memory state."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

import offload_skip
from speculative import cache_keyword, last_logits_only

from .base import UsageError
from .experiment import Run, inference
from .hostmem import AnonPeak, rss_split_bytes
from .schema import BUSY_OTHER_CPU_SHARE


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class DecodeTiming:
    prefill_s: float  # start of the inference (session entry included) to the first new token
    decode_s: float   # the remaining new tokens
    tokens: torch.Tensor  # the new token ids, [1, max_new_tokens]


def _padding(mask: torch.Tensor | None) -> dict:
    """attention_mask and position_ids of a left-padded batch, as generate() makes them:
    positions count each row's real tokens only. {} without a mask (no padding)."""
    if mask is None:
        return {}
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    return {"attention_mask": mask, "position_ids": positions}


def decode(model, input_ids: torch.Tensor, max_new_tokens: int, kv_cache: bool = True,
           context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
           attention_mask: torch.Tensor | None = None, on_token: Callable[[], object] | None = None) -> DecodeTiming:
    """Greedy decoding through the model's forward: the one decode path every variant is timed on.

    Prefill runs the prompt and picks the first token; then one token per step, from the KV
    cache, or with ``kv_cache=False`` recomputing the whole sequence every step (the
    original's slow variant). Exactly max_new_tokens tokens, EOS ignored, so every run does
    the same work. The context is entered inside the timed region (a session's loads count
    as prefill) and left outside it. A batch of prompts is left-padded: `attention_mask`
    marks the real tokens (None: no padding). on_token: called as each token is picked (a
    progress bar's tick: a time check per call and at most 10 writes a second, microseconds
    beside a step's milliseconds, and no device synchronisation).
    """
    tick = on_token or (lambda: None)
    device = input_ids.device
    keep = last_logits_only(model)
    cache = cache_keyword(model)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        with context():
            mask = attention_mask
            out = model(input_ids=input_ids, use_cache=kv_cache, **keep, **_padding(mask))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(device)
            first = time.perf_counter()
            tick()
            tokens, sequence = [token], input_ids
            past = getattr(out, cache) if kv_cache else None
            for _ in range(max_new_tokens - 1):
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                if kv_cache:
                    padding = _padding(mask)
                    if padding:
                        padding["position_ids"] = padding["position_ids"][:, -1:]
                    out = model(input_ids=token, **{cache: past}, use_cache=True, **padding)
                    past = getattr(out, cache)
                else:
                    sequence = torch.cat([sequence, token], dim=1)
                    out = model(input_ids=sequence, use_cache=False, **keep, **_padding(mask))
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                tick()
            synchronize(device)
            end = time.perf_counter()
    return DecodeTiming(first - start, end - first, torch.cat(tokens, dim=1))


def generate(model, input_ids: torch.Tensor, max_new_tokens: int,
             context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             attention_mask: torch.Tensor | None = None,
             on_token: Callable[[], object] | None = None) -> tuple[float, torch.Tensor]:
    """(wall seconds, new tokens) of one greedy ``model.generate`` with KV cache, exactly
    max_new_tokens long (min_new_tokens stops EOS from ending it early). on_token: as decode's,
    through generate's streamer."""
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
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            out = model.generate(input_ids, attention_mask=mask, generation_config=config,
                                 streamer=_Ticks(on_token) if on_token else None)
            synchronize(input_ids.device)
            seconds = time.perf_counter() - start
    return seconds, out[:, input_ids.shape[1]:]


class _Ticks:
    """A generate() streamer that only ticks: put() is called with the prompt, then per new token."""

    def __init__(self, tick: Callable[[], object]):
        self.tick, self.prompt_seen = tick, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.tick()
        self.prompt_seen = True

    def end(self) -> None:
        pass


_STAT_KEYS = ("loads", "loaded_bytes", "load_s", "wait_s", "forward_s", "overlap")


@dataclass(frozen=True)
class CpuLoad:
    """What else ran on the machine while a measurement ran."""
    load_1m_before: float | None  # os.getloadavg()[0]: runnable threads, our own included
    load_1m_after: float | None
    other_cpu_share: float | None  # share of all cores' time spent on other processes (and hypervisor steal)

    @property
    def busy(self) -> bool | None:
        return None if self.other_cpu_share is None else self.other_cpu_share > BUSY_OTHER_CPU_SHARE


def _cpu_sample() -> tuple[float, float | None, float]:
    """(wall s, machine busy s summed over cores, this process's CPU s)."""
    wall, own = time.perf_counter(), sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return wall, None, own
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait is busy
    busy_ticks = sum(fields[:3]) + sum(fields[5:8])
    return wall, busy_ticks / os.sysconf("SC_CLK_TCK"), own


MIN_WATCH_S = 0.5


@contextlib.contextmanager
def watch_cpu():
    """Yields a list that holds one CpuLoad after the block: the load average before and after,
    and how much of the machine other processes used meanwhile (from /proc/stat minus this
    process's own CPU time, reader threads included). A block shorter than MIN_WATCH_S gets
    no share: a tick or two of other work would look like a busy machine."""
    def load() -> float | None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    before_load, (wall0, busy0, own0) = load(), _cpu_sample()
    result: list[CpuLoad] = []
    yield result
    wall1, busy1, own1 = _cpu_sample()
    share = None  # also when the block is too short for /proc/stat's 10 ms ticks to tell
    if busy0 is not None and busy1 is not None and wall1 - wall0 >= MIN_WATCH_S:
        share = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))
    result.append(CpuLoad(before_load, load(), share))


@dataclass(frozen=True)
class Speed:
    """Median timings over the measured repeats, and offload traffic per measured run."""
    prefill_s: float
    decode_tok_s: float | None
    decode_ms_per_tok: float | None
    generate_tok_s: float | None
    tokens: torch.Tensor                 # the new tokens of the last measured run
    peak_bytes: int | None = None        # controller's peak over the repeats (None: baseline)
    cuda_max_allocated_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None  # what runs a small card out of memory: the cache too
    peak_rss_anon_bytes: int | None = None  # host anonymous RSS, sampled over one more (untimed) decode
    stats: dict = field(default_factory=dict)  # _STAT_KEYS: mean per measured run; {} for the baseline
    baseline: Speed | None = None        # the unpatched model, timed interleaved in the same process
    cpu: CpuLoad | None = None           # what else ran meanwhile
    # per repeat, the unpatched decode's seconds over the variant's, the two timed back to back:
    # a drift of the machine's speed slower than one pair cancels in each
    paired_ratios: tuple[float, ...] = ()


def _mean_stats(per_run: list[dict]) -> dict:
    # Means per measured run (sum over repeats / repeats). overlap is the mean of the runs'
    # own overlaps, so its definition stays the controller's.
    return {key: sum(s[key] for s in per_run) / len(per_run) for key in _STAT_KEYS}


def _speed(timings: list[DecodeTiming], generate_s: list[float], n: int, **extra) -> Speed:
    """Throughput over the batch: tokens of every sequence per second; ms per decode step."""
    decode_s = statistics.median(t.decode_s for t in timings)
    batch = timings[-1].tokens.shape[0]
    return Speed(
        prefill_s=statistics.median(t.prefill_s for t in timings),
        decode_tok_s=batch * (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        decode_ms_per_tok=1000 * decode_s / (n - 1) if n > 1 else None,
        generate_tok_s=batch * n / statistics.median(generate_s) if generate_s else None,
        tokens=timings[-1].tokens,
        **extra,
    )


def _cuda_peak(device: torch.device, reset: bool = False) -> tuple[int, int] | None:
    """(max allocated, max reserved) bytes since the last reset; None off CUDA."""
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def measure_speed(run: Run, ctl=None, generate_too: bool = False) -> Speed:
    """--warmup untimed runs, then --repeats measured runs of ``decode`` (median reported);
    with generate_too the same for ``model.generate`` (KV cache on).

    With a controller every repeat of the variant is preceded by one of the unpatched model
    (``ctl.unpatched()``, entered outside the timer; KV cache on: the resident model as it
    is used), and ``Speed.baseline`` holds those medians. On a shared machine speed drifts
    between runs and between machines; a ratio of two medians taken side by side in one
    process is the only one worth printing. Speed.cpu says what else ran meanwhile. On a
    CUDA device too small for the unpatched model (unpatched_fits) only the variant runs.
    """
    with watch_cpu() as cpu:
        speed = _interleaved(run, ctl, generate_too)
    return dataclasses.replace(speed, cpu=cpu[0])


def _interleaved(run: Run, ctl, generate_too: bool) -> Speed:
    args, model, ids, mask = run.args, run.model, run.input_ids, run.attention_mask
    n = args.max_new_tokens
    variant = inference(ctl)
    resident = functools.partial(ctl.unpatched, release=False) if ctl is not None and unpatched_fits(run, ctl) else None
    # One bar over the tokens of every timed and warm-up run, ticked per token (decode's
    # on_token): on a slow CPU a single decode takes minutes, and a user should see it move.
    runs = (args.warmup + args.repeats) * (2 if resident else 1) * (2 if generate_too else 1) + 1
    bar = tqdm(total=runs * n, desc=f"timing {run.variant}", unit="tok", leave=False)

    def step(what: str, fn, *fn_args, **fn_kwargs):
        bar.set_postfix_str(what, refresh=True)
        return fn(*fn_args, on_token=bar.update, **fn_kwargs)

    for _ in range(args.warmup):
        if resident:
            with resident():
                step("warm-up, unpatched", decode, model, ids, n, attention_mask=mask)
        step(f"warm-up, {run.variant}", decode, model, ids, n, args.kv_cache, variant, mask)
    timings, base_timings, per_run, peak, cuda_max, cuda_reserved = [], [], [], None, None, None
    for _ in range(args.repeats):
        if resident:
            with resident():
                base_timings.append(step("decode, unpatched", decode, model, ids, n, attention_mask=mask))
        if ctl is not None:
            ctl.reset_stats()
        _cuda_peak(run.device, reset=True)
        timings.append(step(f"decode, {run.variant}", decode, model, ids, n, args.kv_cache, variant, mask))
        if run.device.type == "cuda":
            allocated, reserved = _cuda_peak(run.device)
            cuda_max, cuda_reserved = max(cuda_max or 0, allocated), max(cuda_reserved or 0, reserved)
        if ctl is not None:
            stats = ctl.stats()
            per_run.append(stats)
            peak = max(peak or 0, stats["peak_resident_bytes"])
    generate_s, base_generate_s = [], []
    if generate_too:
        for _ in range(args.warmup + args.repeats):
            if resident:
                with resident():
                    base_generate_s.append(step("generate(), unpatched", generate, model, ids, n,
                                                attention_mask=mask)[0])
            generate_s.append(step(f"generate(), {run.variant}", generate, model, ids, n, variant, mask)[0])
        generate_s, base_generate_s = generate_s[args.warmup:], base_generate_s[args.warmup:]
    # Sampling /proc from a thread would take CPU from the timed runs: one more run, untimed, from
    # the idle state: otherwise the heap the interleaved unpatched runs freed, which glibc keeps,
    # would count as this run's.
    settle(run, ctl)
    with AnonPeak() as anon:
        step(f"anonymous RSS, {run.variant}", decode, model, ids, n, args.kv_cache, variant, mask)
    bar.close()
    if resident and run.device.type == "cuda":
        cuda_reserved = _variant_reserved_peak(run, variant)
    baseline = _speed(base_timings, base_generate_s, n) if base_timings else None
    paired = tuple(b.decode_s / t.decode_s for b, t in zip(base_timings, timings) if t.decode_s > 0)
    return _speed(timings, generate_s, n, paired_ratios=paired, peak_bytes=peak, cuda_max_allocated_bytes=cuda_max,
                  cuda_max_reserved_bytes=cuda_reserved, peak_rss_anon_bytes=anon.bytes,
                  stats=_mean_stats(per_run) if per_run else {}, baseline=baseline)


def _variant_reserved_peak(run: Run, variant) -> int:
    """The variant's own reserved peak, from one more untimed decode: in the timed runs the
    allocator still caches what the interleaved unpatched run held (the whole model), which
    the reserved peak would include. Emptying the cache inside the timed runs instead would
    put allocator calls in them."""
    torch.cuda.empty_cache()
    _cuda_peak(run.device, reset=True)
    decode(run.model, run.input_ids, run.args.max_new_tokens, run.args.kv_cache, variant, run.attention_mask)
    return _cuda_peak(run.device)[1]


def cold_read_bytes_s(ctl) -> float:
    """Storage read rate of the streamed layer files: each dropped from the page cache and read
    once, one after the other, into one host buffer; total bytes / total seconds."""
    store = ctl.store
    layers = [i for i in ctl.computed_layers if i not in ctl.keep] or ctl.computed_layers
    buffer = torch.empty(max(ctl.layer_bytes[i] for i in layers), dtype=torch.uint8)
    cold, store.cold = store.cold, True
    try:
        start = time.perf_counter()
        for i in layers:
            store.read_into(i, buffer)
        seconds = time.perf_counter() - start
    finally:
        store.cold = cold
        store.close()
    return sum(ctl.layer_bytes[i] for i in layers) / seconds


@dataclass(frozen=True)
class Memory:
    standby_bytes: int
    rss_bytes: int | None
    cuda_allocated_bytes: int | None
    cuda_reserved_bytes: int | None = None
    # standby_bytes by part (offload_skip.weight_breakdown): embedding_bytes, head_bytes,
    # resident_layers_bytes, other_bytes; they sum to standby_bytes
    parts: dict = field(default_factory=dict)
    # rss_bytes by kind of page (hostmem.rss_split_bytes), read just after it; None off Linux
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None


def weight_bytes(model, ctl, device: torch.device) -> int:
    """Weights resident on the compute device now (parameters, buffers, NF4 quant states)."""
    if ctl is not None:
        return ctl.resident_bytes()
    return offload_skip.tensor_bytes(offload_skip.module_tensors(model), device)


def unpatched_fits(run: Run, ctl) -> bool:
    """Whether this process can also run the unpatched model (every offloaded layer back on the
    device): always on CPU; on CUDA when free memory (the driver's free plus the allocator's
    cached, unused blocks) exceeds ctl.offloaded_bytes() by 10%. A model larger than the
    device, which the streamed load exists for, gets no same-run baseline (a message says so)."""
    if ctl is None or run.device.type != "cuda":
        return True
    if "unpatched_fits" in run.info:  # decided once a run, said once
        return run.info["unpatched_fits"]
    free_bytes, _ = torch.cuda.mem_get_info(run.device)
    cached_bytes = torch.cuda.memory_reserved(run.device) - torch.cuda.memory_allocated(run.device)
    need_bytes = int(ctl.offloaded_bytes() * 1.1)
    run.info["unpatched_fits"] = fits = free_bytes + cached_bytes >= need_bytes
    if not fits:
        print(f"the unpatched model does not fit on {run.device} ({need_bytes / 1e6:.0f} MB needed, "
              f"{(free_bytes + cached_bytes) / 1e6:.0f} MB free): no same-run baseline, its columns stay empty")
    return fits


def measure_unpatched(run: Run, ctl) -> Memory | None:
    """The unpatched model's idle state in this process, the variant rows' baseline: measured
    inside ``ctl.unpatched()`` (every offloaded layer read back and in place; its tensors are
    views of one buffer per layer, so alignment padding, < 256 bytes a tensor, is counted).
    A patched variant loads streamed, so the model was never whole before patching."""
    if ctl is None:
        return measure_memory(run)
    if not unpatched_fits(run, ctl):
        return None
    with ctl.unpatched():
        ctl.release_staging()  # as the variant is measured: after standby(), which releases it
        return measure_memory(run)


def settle(run: Run, ctl=None) -> None:
    """Bring the process to its idle state: standby() (the pinned staging released, mapped
    layer files unmapped), garbage collected, the CUDA allocator's cache and the freed heap
    handed back."""
    if ctl is not None:
        ctl.standby()
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    offload_skip.trim_host_memory()


def measure_memory(run: Run, ctl=None) -> Memory:
    """The idle state (settle), then weights, process RSS (on CUDA: host memory, the
    CUDA context's host side) split into anonymous and file-backed pages, and CUDA allocated /
    reserved."""
    settle(run, ctl)
    cuda = run.device.type == "cuda"
    try:
        import psutil
    except ImportError:
        raise UsageError("measuring RSS needs psutil; run: pip install psutil") from None
    rss = psutil.Process().memory_info().rss
    rss_anon, rss_file = rss_split_bytes()
    allocated = torch.cuda.memory_allocated(run.device) if cuda else None
    reserved = torch.cuda.memory_reserved(run.device) if cuda else None
    parts = offload_skip.weight_breakdown(run.model, run.device)
    return Memory(weight_bytes(run.model, ctl, run.device), rss, allocated, parts=parts, cuda_reserved_bytes=reserved,
                  rss_anon_bytes=rss_anon, rss_file_bytes=rss_file)


