"""Fitting a model to a device (--device-budget): the probe that measures this machine's rates
for a model, cached per machine and model, and the patch that runs offload_skip.plan's choice.

The probe times short greedy decodes of the run's own prompt with every layer streamed by
copy, and the output head alone:

    read rate        the controller's loaded_bytes / load_s, no read-ahead (page cache, or the
                     storage with --cold / --io-bandwidth)
    streamed layer   the step time with every layer streamed, less that with all but one kept
                     (a GPU: those that fit the budget), per layer streamed: its read and binding
    per layer        (step with every layer streamed - head) / layers - one streamed layer's cost
    head             median of a [batch, 1, hidden] forward through the output head
    read's share     a CPU: one layer read ahead, the share of a background read's time that the
                     compute loses (fitted so stream_step_s gives that step time); a GPU: 0
    host layer       a GPU with --allow-host-compute: every layer computed by the host, per layer

A probe's rates are kept in <cache-dir>/probes/<key>.json, the key naming what they depend
on: the machine and device, torch, the layer files' fingerprint, batch, prompt and decode
length, and how reads come (cold, throttled). A file that does not parse, or holds another
key, is an error naming it; a probe taken while other work used the machine is not kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import offload_skip

from .base import UsageError
from .experiment import Run, inference, layers_dir, load_peak_bytes, patch
from .measure import decode, synchronize, watch_cpu
from .provenance import cpu_isa, device_name

PROBE_TOKENS = 16       # tokens each probe decode decodes (15 timed steps after the prefill)
PROBE_ROUNDS = 5        # timed rounds of the probe's configurations (after one untimed)
PROBE_FORMAT = 6        # a probe file's layout; another one is measured again


def patch_run(run: Run):
    """The run's residency: the plan for --device-budget, else experiment.patch's."""
    return patch_to_fit(run) if getattr(run.args, "device_budget", None) else patch(run)


def patch_to_fit(run: Run):
    """Probe (or read the cached probe), plan for --device-budget, print the plan and patch the
    model with it; the Plan goes into run.info["plan"] for the row."""
    args, store = run.args, run.info["store"]
    shape = offload_skip.ModelBytes.of(run.model, run.device, store)
    plan = plan_for(run, shape, f"--device-budget {args.device_budget:,}")
    print(plan, flush=True)
    try:
        ctl = offload_skip.patch_model(run.model, plan, layers_dir(args), store=store, cold=args.cold,
                                       io_bandwidth=args.io_bandwidth)
    except ValueError as err:
        raise UsageError(str(err)) from None
    run.info["plan"] = plan
    run.info["load_peak_bytes"] = max(run.info["load_peak_bytes"], load_peak_bytes(run.device, ctl.load_peak_bytes))
    return ctl


def plan_for(run: Run, shape: offload_skip.ModelBytes, label: str, rates: offload_skip.Rates | None = None,
             drafts: tuple[offload_skip.DraftRates, ...] = ()) -> offload_skip.Plan:
    """offload_skip.plan for run.args.device_budget with `rates` (default: this machine's,
    rates_for) and `drafts` weighed; a budget nothing fits is refused before probing (bytes do
    not depend on the rates), as a UsageError starting with `label`."""
    args = run.args
    fields = dict(context_tokens=context_tokens(run), batch_size=run.input_ids.shape[0], device=run.device,
                  allow_host_compute=getattr(args, "allow_host_compute", False), cpu_reads=cpu_reads(args))
    try:
        offload_skip.plan(shape, args.device_budget, rates=offload_skip.Rates(1.0, 1.0, 1.0, source="bytes only"),
                          **fields)
    except ValueError as err:
        raise UsageError(f"{label}: {err}") from None
    return offload_skip.plan(shape, args.device_budget, rates=rates or rates_for(run, run.info["store"]),
                             drafts=drafts, **fields)


def cpu_reads(args) -> tuple[str, ...]:
    """The CPU read paths a plan may choose: copy alone when reads are cold or throttled."""
    return ("copy",) if args.cold or args.io_bandwidth else offload_skip.CPU_READS


def context_tokens(run: Run) -> int:
    """The tokens the KV cache holds at the end: the prompt and the decode (eval_ppl.py: a window)."""
    max_new_tokens = getattr(run.args, "max_new_tokens", None)
    return run.input_ids.shape[1] + max_new_tokens if max_new_tokens else run.args.ppl_ctx


def probe_key(run: Run, store: offload_skip.LayerStore) -> dict:
    """What a probe's rates depend on."""
    args = run.args
    return dict(format=PROBE_FORMAT, device=device_name(run.device), cpu_isa=cpu_isa(), threads=torch.get_num_threads(),
                torch=torch.__version__, layers=store.dir.name, batch=int(run.input_ids.shape[0]),
                prompt_tokens=int(run.input_ids.shape[1]), max_new_tokens=int(getattr(args, "max_new_tokens", 0)),
                cold=bool(args.cold), io_bandwidth=args.io_bandwidth,
                host_compute=bool(getattr(args, "allow_host_compute", False)) and run.device.type != "cpu")


def probe_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "probes" / f"{digest}.json"


def read_probe(path: Path, key: dict) -> offload_skip.Rates | None:
    """The cached rates for `key`, None when there are none; a bad file is a CacheError naming it."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved["key"] != key:
            raise ValueError("it holds another probe's key")
        return offload_skip.Rates(**saved["rates"])
    except (ValueError, KeyError, TypeError) as err:
        raise offload_skip.CacheError(f"{path}: bad probe file ({err}); delete it to measure again") from None


def rates_for(run: Run, store: offload_skip.LayerStore) -> offload_skip.Rates:
    """This machine's rates for the run's model: cached, or probed now and cached."""
    key = probe_key(run, store)
    path = probe_path(run.args.cache_dir, key)
    rates = read_probe(path, key)
    if rates is None:
        with watch_cpu() as load:
            rates = measure_rates(run, store, source=f"probe {path.name}")
        if load[0].busy:  # measured beside other work: used once, not kept
            print(f"{run.args.command.split()[1] if run.args.command else 'probe'}: other work used "
                  f"{load[0].other_cpu_share:.0%} of the machine while probing; the rates are used for this run "
                  "only, not cached", file=sys.stderr)
            return dataclasses.replace(rates, source=rates.source + " (busy, not cached)")
        path.parent.mkdir(parents=True, exist_ok=True)
        offload_skip.atomic_write(path, [json.dumps({"key": key, "rates": rates.__dict__}, indent=1).encode()])
    return rates


def measure_rates(run: Run, store: offload_skip.LayerStore, source: str = "") -> offload_skip.Rates:
    """The probe (module docstring): the model must have every layer stored and empty
    (open_run for --device-budget); it is left so. Its configurations are timed in interleaved
    rounds (probe_steps), so a drift of the machine moves them alike: every layer streamed;
    all but one kept (a CPU) or the first that fit the budget (a GPU), whose difference per
    streamed layer is a streamed layer's cost in the compute thread (its read, binding its
    views); on a CPU every layer streamed with one read ahead (the read's share of compute);
    on a GPU with --allow-host-compute every layer computed by the host."""
    args, model = run.args, run.model
    n_layers = len(offload_skip.find_decoder_layers(model))
    shape = offload_skip.ModelBytes.of(model, run.device, store)
    cpu = run.device.type == "cpu"
    if cpu:  # host memory: all but one layer kept, the widest difference
        keep = tuple(range(n_layers - 1))
    else:  # a GPU must not run out: the first layers that fit the budget beside one slot
        fixed_bytes = shape.embedding_bytes + shape.head_bytes + shape.other_bytes + max(shape.layer_bytes)
        room = args.device_budget - fixed_bytes - shape.kv_bytes_per_token * context_tokens(run)
        keep = tuple(sorted(offload_skip.fit_budget(dict(enumerate(shape.layer_bytes)), max(room, 0))))[:n_layers - 1]
    configs = {"everything": dict(keep=())}
    if keep:
        configs["part"] = dict(keep=keep)
    if cpu:
        configs["ahead"] = dict(keep=(), prefetch=1)
    elif getattr(args, "allow_host_compute", False):
        configs["host"] = dict(keep=(), host_compute=tuple(range(n_layers)))
    steps = probe_steps(run, store, configs)
    everything = steps["everything"]
    read_Bps = everything["loaded_bytes"] / everything["load_s"]
    head = head_s(model, run.device, int(run.input_ids.shape[0]))
    read_s = sum(shape.layer_bytes) / n_layers / read_Bps  # one layer's
    streamed_s = (everything["step_s"] - steps["part"]["step_s"]) / len(keep) if keep else read_s
    layer_s = max((everything["step_s"] - head) / n_layers - streamed_s, 0.0)
    rates = offload_skip.Rates(layer_compute_s=layer_s, fixed_compute_s=head, read_Bps=read_Bps,
                               stream_overhead_s=max(streamed_s - read_s, 0.0), read_compute_share=0.0, source=source)
    if cpu:
        return dataclasses.replace(rates, read_compute_share=fitted_share(rates, shape, steps["ahead"]["step_s"]))
    if "host" in steps:  # the copy engine: a read takes nothing from the compute
        return dataclasses.replace(rates, host_layer_compute_s=max(steps["host"]["step_s"] - head, 0.0) / n_layers)
    return rates


SHARE_LIMIT = 4.0  # a background read slowing compute by up to 4x its own time (threads beyond the cores)


def fitted_share(rates: offload_skip.Rates, shape: offload_skip.ModelBytes, measured_step_s: float) -> float:
    """The read_compute_share at which stream_step_s predicts `measured_step_s` for every layer
    streamed with one layer read ahead (bisection; the prediction grows with the share). On a
    CPU a background read is a memcpy on the cores torch computes on: from the page cache it
    costs the compute at least its own time, more when the reader thread is one thread more
    than the cores; from a cold disk the wait is off the cores."""
    compute = [rates.layer_compute_s + rates.stream_overhead_s] * len(shape.layer_bytes)
    reads = {i: n / rates.read_Bps for i, n in enumerate(shape.layer_bytes)}
    low, high = 0.0, SHARE_LIMIT
    for _ in range(30):
        mid = (low + high) / 2
        if offload_skip.stream_step_s(compute, rates.fixed_compute_s, reads, 1, mid) < measured_step_s:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def probe_steps(run: Run, store: offload_skip.LayerStore, configs: dict[str, dict]) -> dict[str, dict]:
    """Per configuration (OffloadConfig fields beyond every layer streamed by copy, no read-ahead):
    the median seconds per decode step over PROBE_ROUNDS rounds, after one untimed, each round
    decoding PROBE_TOKENS once with every configuration in turn (the order rotated); and the
    last decode's read counters."""
    args, model = run.args, run.model
    n_layers = len(offload_skip.find_decoder_layers(model))
    steps, stats, names = {k: [] for k in configs}, {}, list(configs)
    for r in range(PROBE_ROUNDS + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fields = {"prefetch": 0, **configs[name]}
            config = offload_skip.OffloadConfig(mode="stream", runs="sequential", cpu_read="copy", cold=args.cold,
                                                io_bandwidth=args.io_bandwidth, **fields)
            try:
                ctl = offload_skip.patch_model(model, list(range(n_layers)), layers_dir(args), config=config,
                                               store=store, progress=False)
            except ValueError as err:  # e.g. host compute of NF4 layers
                raise UsageError(str(err)) from None
            try:
                ctl.reset_stats()
                timing = decode(model, run.input_ids, PROBE_TOKENS, context=inference(ctl),
                                attention_mask=run.attention_mask)
                stats[name] = ctl.stats()
            finally:
                ctl.unpatch(restore=False)
            if r:  # the first round warms every configuration up
                steps[name].append(timing.decode_s / (PROBE_TOKENS - 1))
    return {name: {**stats[name], "step_s": statistics.median(steps[name])} for name in names}


def head_s(model, device: torch.device, batch: int, repeats: int = 5) -> float:
    """Median seconds of the output head on one token per sequence."""
    head = model.get_output_embeddings()
    dtype = model.get_input_embeddings().weight.dtype  # the compute dtype (an NF4 head's weight is uint8)
    hidden = torch.randn(batch, 1, head.in_features, dtype=dtype, device=device)
    seconds = []
    with torch.no_grad():
        head(hidden)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            head(hidden)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
