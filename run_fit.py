"""The plan against a search: offload_skip.plan's configuration for a device budget, timed in
one process beside a grid of hand configurations, interleaved round by round, each a row of
results/fit.csv with its predicted and measured speed and its peak bytes.

The grid: three layer sets of the plan's bytes (first-fit, interleaved, last: the fewest
streamed layers that fit), each with read-ahead 0, 1 and 2 and read by copy; the same sets
mapped (a CPU: every mapped layer stays until standby, so they hold all of it; read once, never
cold); and today's
defaults at that budget (--layers even, the even layers kept first-fit under what is left of
the budget, --prefetch auto, --cpu-read map, and the same with copy). Every configuration is
the same model at alpha 1: every layer has a file, the resident ones are kept (exact).

With --draft (lookup or a draft model), the draft is probed first in the plan's configuration
(bench.drafting.probe_draft) and the plan weighs it; the grid gains, for each placement, the
fewest streamed layers that fit beside the draft, read as the plan reads, decoding
speculatively ("+draft"), today's defaults with the draft, and the plan's best alternative of
the other kind ("plan-alternative": without the draft when the plan drafts, with it when not).

    python run_fit.py --model smollm2-135m --quant bf16 --budget-share 0.5
    python run_fit.py --model qwen2.5-coder-1.5b --quant nf4 --budget-share 0.75 --cold
    python run_fit.py --model smollm2-135m --quant bf16 --budget-share 0.5 --cold --draft lookup
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from tqdm import tqdm

import bench
import offload_skip

DEFAULT_OUT = bench.RESULTS_DIR / "fit.csv"


@bench.csv_row
class FitRow:
    """One configuration of one fit case: a row of results/fit.csv."""
    case_id: str  # the case (model, quant, budget, reads) this configuration was timed in; its rows share it
    config: str  # plan (offload_skip.plan's choice), grid:<placement>:<read>:<prefetch>, default (today's defaults at
        # the budget: --layers even, first-fit --budget, --prefetch auto, --cpu-read map) or default-copy
    model: str  # --model as given
    weights: str  # real or dummy
    quant: str  # weight format
    device: str  # compute device
    device_name: str  # CUDA device name, or 'CPU: <model name>'
    cold_reads: bool  # the case's reads dropped each file from the page cache first (--cold); a mapped configuration
        # maps each layer once, so its rows read the page cache whatever this says
    device_budget_bytes: int  # the device bytes the case fits to (weights at the peak plus the KV reserve)
    budget_share: float | None  # --budget-share: device_budget_bytes / model_bytes (empty: --device-budget given)
    model_bytes: int  # the whole model's weights as the plan counts them (layers, embedding, head, the rest)
    kv_reserve_bytes: int  # the KV cache reserved for context_tokens x batch_size
    context_tokens: int  # prompt tokens + max_new_tokens: the KV cache at the end of the decode
    placement: str  # none (nothing streams), first-fit, interleaved, last, or even (the default's)
    streamed_layers: str  # layers read per token, space-separated
    prefetch: int  # read-ahead depth
    cpu_read: str | None  # copy or map (CPU); empty on CUDA
    embedding_residency: str  # resident or disk (its rows read per token)
    draft: str  # the draft it decodes speculatively with (--draft), empty: plain decoding
    draft_bytes: int  # the draft's device bytes: its weights (measured) and its KV cache for context_tokens
    tokens_per_verify: float | None  # measured new tokens per target forward, speculative configurations only
    predicted_decode_tok_s: float  # offload_skip.candidate's prediction from the probed rates
    predicted_peak_bytes: int  # predicted peak weights, counted as peak_bytes is
    decode_tok_s: float  # median over the rounds
    decode_tok_s_q1: float  # first quartile over the rounds
    decode_tok_s_q3: float  # third quartile over the rounds
    predicted_over_measured: float  # predicted_decode_tok_s / decode_tok_s
    peak_bytes: int  # most weight bytes on the device in any round (controller accounting, stream slots and kept layers)
    fits: bool  # peak_bytes + kv_reserve_bytes + draft_bytes <= device_budget_bytes
    fastest_fitting: bool  # the fastest measured configuration of the case among those that fit
    plan_over_fastest: float | None  # the plan's decode_tok_s / the fastest fitting one's (the plan's row only)
    max_new_tokens: int  # tokens decoded per round
    rounds: int  # timed rounds (each configuration once per round, the order rotated)
    other_cpu_share: float | None  # other processes' share of the machine during the rounds
    busy: bool | None  # other_cpu_share > 0.1: the speeds are not trusted
    rates: str  # the probed rates: layer compute ms, a streamed layer's overhead ms, head ms, read GB/s, read
        # compute share; with --draft, the draft's: tokens per verify, drafting and extra verify ms per verify
    command: str  # the command line that wrote the row
    run_id: str  # the invocation


def build_parser():
    parser = bench.build_parser("diskoffload", description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    parser.add_argument("--budget-share", type=float, default=None, metavar="F",
                        help="the device budget as this share of the model's bytes (0 < F <= 1), instead of "
                             "--device-budget")
    parser.add_argument("--rounds", type=bench.int_at_least(1), default=3,
                        help="timed rounds, each configuration once per round (after one untimed round)")
    bench.drafting.add_arguments(parser, prompt_sets=False)
    parser.set_defaults(out=DEFAULT_OUT, max_new_tokens=16)
    return parser


def finish(args):
    bench.drafting.check_arguments(args)
    if args.draft != "none":
        bench.drafting.check_planned_draft(args)
    if (args.budget_share is None) == (args.device_budget is None):
        raise bench.UsageError("give one of --device-budget SIZE and --budget-share F")
    if args.budget_share is not None and not 0 < args.budget_share <= 1:
        raise bench.UsageError(f"--budget-share {args.budget_share}: must be in (0, 1]")
    args.device_budget, share = args.device_budget or 1, args.budget_share  # checked now, set once loaded
    args = bench.finish_args(args, FitRow, plans_drafts=True)
    args.device_budget = None if share is not None else args.device_budget
    return args


def configurations(plan: offload_skip.Plan, device,
                   draft: offload_skip.DraftRates | None = None) -> dict[str, offload_skip.Candidate]:
    """The plan and the grid (module docstring), each as the Candidate it predicts."""
    shape, rates, budget, kv = plan.shape, plan.rates, plan.device_bytes, plan.chosen.kv_bytes
    n = len(shape.layer_bytes)
    reads = ("copy", "map") if device.type == "cpu" else (None,)
    configs = {"plan": plan.chosen}
    streamed_count = max(len(plan.streamed), 1)
    for placement in offload_skip.PLACEMENTS:
        streamed = offload_skip.placement_streamed(n, streamed_count, placement)
        for read in reads:
            for depth in ((0, 1, 2) if read != "map" else (0,)):
                configs[f"grid:{placement}:{read or 'cuda'}:{depth}"] = offload_skip.candidate(
                    shape, rates, streamed, depth, read, True, kv, placement)
    even = offload_skip.select_layers(n, "even")
    slot = max(shape.layer_bytes[i] for i in even)
    fixed = shape.embedding_bytes + shape.head_bytes + shape.other_bytes
    odd = sum(b for i, b in enumerate(shape.layer_bytes) if i not in even)
    left = max(budget - kv - fixed - odd - slot * (bench.CPU_DEFAULT_PREFETCH + 1), 0)
    kept = offload_skip.fit_budget({i: shape.layer_bytes[i] for i in even}, left)
    default = tuple(i for i in even if i not in kept)
    prefetch = bench.CPU_DEFAULT_PREFETCH if device.type == "cpu" else bench.CUDA_DEFAULT_PREFETCH
    for name, read in (("default", "map"), ("default-copy", "copy")):
        configs[name] = offload_skip.candidate(shape, rates, default, prefetch, read if device.type == "cpu" else None,
                                               False, kv, "even")
    if draft is not None:
        configs.update(drafted_configurations(plan, configs["default"], draft))
    return configs


def drafted_configurations(plan: offload_skip.Plan, default: offload_skip.Candidate,
                           draft: offload_skip.DraftRates) -> dict[str, offload_skip.Candidate]:
    """The grid's speculative half: per placement, the fewest streamed layers that fit beside
    the draft, read as the plan reads (copy, one ahead, where the plan streams nothing); today's
    defaults with the draft; the plan's best alternative of the other kind."""
    shape, rates, kv, context = plan.shape, plan.rates, plan.chosen.kv_bytes, plan.context_tokens
    n = len(shape.layer_bytes)
    chosen = plan.chosen
    read, depth = (chosen.cpu_read, chosen.prefetch) if chosen.streamed else (default.cpu_read and "copy", 1)
    configs = {}
    for placement in offload_skip.PLACEMENTS:
        configs[f"grid:{placement}:{read or 'cuda'}:{depth}+draft"] = offload_skip.fewest_streamed(
            shape, plan.device_bytes, lambda k: offload_skip.drafted(offload_skip.candidate(
                shape, rates, offload_skip.placement_streamed(n, k, placement), depth, read, True, kv, placement),
                draft, shape, context))
    configs["default+draft"] = offload_skip.drafted(default, draft, shape, context)
    others = [c for c in plan.candidates if bool(c.draft) != bool(chosen.draft) and c.device_bytes <= plan.device_bytes]
    if others:
        configs["plan-alternative"] = min(others, key=lambda c: c.step_s)
    return configs


def config_of(c: offload_skip.Candidate, n_layers: int, args) -> offload_skip.OffloadConfig:
    mapped = c.cpu_read == "map"  # a mapped layer is read once: never cold, never throttled
    return c.config(n_layers, cold=args.cold and not mapped, io_bandwidth=None if mapped else args.io_bandwidth)


def patched(run_, store, c: offload_skip.Candidate, args):
    """The model patched to run candidate c (unpatch(restore=False) leaves every layer stored and empty)."""
    n = len(offload_skip.find_decoder_layers(run_.model))
    return offload_skip.patch_model(run_.model, list(range(n)), bench.experiment.layers_dir(args),
                                    config=config_of(c, n, args), store=store, progress=False)


def probe_draft(run_, store, plan: offload_skip.Plan, drafter, args) -> offload_skip.DraftRates:
    """The draft's rates, measured in the no-draft plan's configuration."""
    ctl = patched(run_, store, plan.chosen, args)
    try:
        return bench.drafting.probe_draft(run_, ctl, drafter)
    finally:
        ctl.unpatch(restore=False)


def decode_s(run_, ctl, c: offload_skip.Candidate, drafter, schedule, args) -> tuple[float, float | None]:
    """One decode of configuration c: seconds after the prompt's forward, and (speculative) tokens per verify."""
    if not c.draft:
        timing = bench.decode(run_.model, run_.input_ids, args.max_new_tokens, context=bench.inference(ctl),
                              attention_mask=run_.attention_mask)
        return timing.decode_s, None
    seconds, out = bench.drafting.timed_speculative(run_, ctl, drafter, schedule, run_.input_ids)
    return seconds, (args.max_new_tokens - 1) / max(out.target_forwards - 1, 1)


def time_rounds(run_, store, configs: dict, args, drafter=None) -> tuple[dict, dict, dict, list]:
    """decode tok/s per round, the peak bytes and (speculative) tokens per verify of each
    configuration, interleaved; each speculative configuration keeps its own schedule, as a
    long-running decoder would."""
    names = list(configs)
    speeds, peaks, verified = {k: [] for k in names}, dict.fromkeys(names, 0), {k: [] for k in names}
    schedules = {k: bench.drafting.make_schedule(args) for k in names if configs[k].draft}
    total = (args.rounds + 1) * len(names)
    with bench.measure.watch_cpu() as load, tqdm(total=total, desc="fit rounds", unit="config") as bar:
        for r in range(args.rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                ctl = patched(run_, store, configs[name], args)
                try:
                    ctl.reset_stats()
                    seconds, tokens_per_verify = decode_s(run_, ctl, configs[name], drafter, schedules.get(name), args)
                    peaks[name] = max(peaks[name], ctl.stats()["peak_resident_bytes"])
                finally:
                    ctl.unpatch(restore=False)
                if r:  # the first round warms every configuration up
                    speeds[name].append(run_.input_ids.shape[0] * (args.max_new_tokens - 1) / seconds)
                    if tokens_per_verify is not None:
                        verified[name].append(tokens_per_verify)
                bar.update()
    return speeds, peaks, verified, load


def run(args) -> list[FitRow]:
    args.layers = "plan"
    run_ = bench.open_run(args)
    store, device = run_.info["store"], run_.device
    shape = offload_skip.ModelBytes.of(run_.model, device, store)
    model_bytes = sum(shape.layer_bytes) + shape.embedding_bytes + shape.head_bytes + shape.other_bytes
    budget = args.device_budget or int(args.budget_share * model_bytes)
    context = bench.planning.context_tokens(run_)
    kv = shape.kv_bytes_per_token * context * run_.input_ids.shape[0]
    args.device_budget = budget  # the probe keeps what fits it
    label = f"device budget {budget:,} bytes"
    plan = bench.planning.plan_for(run_, shape, label)
    draft = drafter = None
    if args.draft != "none":
        drafter = bench.drafting.make_drafter(run_, None)  # lookup or a model: no layer of the target's
        draft = probe_draft(run_, store, plan, drafter, args)
        print(f"draft {draft.kind}: {draft.tokens_per_verify:.2f} tokens per verify, drafting "
              f"{draft.draft_s_per_verify * 1e3:.2f} ms and +{draft.verify_extra_s * 1e3:.2f} ms of verify per "
              f"verify, {draft.resident_bytes / 2**20:.1f} MiB resident ({draft.source})", flush=True)
        plan = bench.planning.plan_for(run_, shape, label, rates=plan.rates, drafts=(draft,))
    print(plan, flush=True)
    configs = configurations(plan, device, draft)
    speeds, peaks, verified, load = time_rounds(run_, store, configs, args, drafter)
    rows = make_rows(run_, args, configs, (speeds, peaks, verified), load[0], (budget, model_bytes, kv, context),
                     plan.rates, draft)
    for row in rows:
        print(f"  {row.config:<32} {row.decode_tok_s:7.2f} tok/s (predicted {row.predicted_decode_tok_s:7.2f}), "
              f"peak {row.peak_bytes / 2**20:7.1f} MiB + KV {kv / 2**20:.1f} MiB"
              + (f" + draft {row.draft_bytes / 2**20:.1f} MiB" if row.draft else "")
              + f" {'fits' if row.fits else 'OVER the budget'}{'  <- fastest that fits' if row.fastest_fitting else ''}")
    path = bench.save_rows(args.out, rows, args.row_file)
    print(f"  {bench.rows.saved_line(path, args)}")
    return rows


def make_rows(run_, args, configs, timed, load, sizes, rates, draft) -> list[FitRow]:
    (speeds, peaks, verified), (budget, model_bytes, kv, context) = timed, sizes
    median = {k: statistics.median(v) for k, v in speeds.items()}
    fits = {k: peaks[k] + kv + configs[k].draft_bytes <= budget for k in configs}
    fitting = [k for k in configs if fits[k]]
    fastest = max(fitting, key=median.get) if fitting else None
    case_id = f"{args.model}-{run_.info['quant']}-{budget}-{'cold' if args.cold else 'cached'}-{run_.run_id}"
    rates_text = (f"layer {rates.layer_compute_s * 1e3:.3f} ms, streamed +{rates.stream_overhead_s * 1e3:.3f} ms, "
                  f"head {rates.fixed_compute_s * 1e3:.3f} ms, "
                  f"read {rates.read_Bps / 1e9:.2f} GB/s, share {rates.read_compute_share:.2f}"
                  + (f"; draft {draft.kind} {draft.tokens_per_verify:.2f} tokens/verify, drafting "
                     f"{draft.draft_s_per_verify * 1e3:.3f} ms, verify +{draft.verify_extra_s * 1e3:.3f} ms"
                     if draft else ""))
    rows = []
    for name, c in configs.items():
        q = statistics.quantiles(speeds[name], n=4) if len(speeds[name]) > 1 else [median[name]] * 3
        predicted = run_.input_ids.shape[0] / c.step_s
        rows.append(FitRow(
            case_id=case_id, config=name, model=args.model, weights=run_.info["weights"], quant=run_.info["quant"],
            device=run_.device.type, device_name=bench.device_name(run_.device), cold_reads=bool(args.cold),
            device_budget_bytes=budget, budget_share=args.budget_share, model_bytes=model_bytes,
            kv_reserve_bytes=kv, context_tokens=context, placement=c.placement,
            streamed_layers=" ".join(map(str, c.streamed)), prefetch=c.prefetch, cpu_read=c.cpu_read,
            embedding_residency="disk" if c.offload_embeddings else "resident", draft=c.draft,
            draft_bytes=c.draft_bytes,
            tokens_per_verify=statistics.median(verified[name]) if verified[name] else None,
            predicted_decode_tok_s=predicted, predicted_peak_bytes=c.weights_bytes,
            decode_tok_s=median[name], decode_tok_s_q1=q[0], decode_tok_s_q3=q[2],
            predicted_over_measured=predicted / median[name], peak_bytes=peaks[name],
            fits=fits[name], fastest_fitting=name == fastest,
            plan_over_fastest=median["plan"] / median[fastest] if name == "plan" and fastest else None,
            max_new_tokens=args.max_new_tokens, rounds=args.rounds, other_cpu_share=load.other_cpu_share,
            busy=load.busy, rates=rates_text, command=args.command, run_id=run_.run_id, **bench.environment()))
    return rows


def main(argv: list[str] | None = None) -> int:
    return bench.main(run, build_parser(), argv, finish=finish)


if __name__ == "__main__":
    sys.exit(main())
