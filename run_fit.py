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

    python run_fit.py --model smollm2-135m --quant bf16 --budget-share 0.5
    python run_fit.py --model qwen2.5-coder-1.5b --quant nf4 --budget-share 0.75 --cold
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
    predicted_decode_tok_s: float  # offload_skip.candidate's prediction from the probed rates
    predicted_peak_bytes: int  # predicted peak weights, counted as peak_bytes is
    decode_tok_s: float  # median over the rounds
    decode_tok_s_q1: float  # first quartile over the rounds
    decode_tok_s_q3: float  # third quartile over the rounds
    predicted_over_measured: float  # predicted_decode_tok_s / decode_tok_s
    peak_bytes: int  # most weight bytes on the device in any round (controller accounting, stream slots and kept layers)
    fits: bool  # peak_bytes + kv_reserve_bytes <= device_budget_bytes
    fastest_fitting: bool  # the fastest measured configuration of the case among those that fit
    plan_over_fastest: float | None  # the plan's decode_tok_s / the fastest fitting one's (the plan's row only)
    max_new_tokens: int  # tokens decoded per round
    rounds: int  # timed rounds (each configuration once per round, the order rotated)
    other_cpu_share: float | None  # other processes' share of the machine during the rounds
    busy: bool | None  # other_cpu_share > 0.1: the speeds are not trusted
    rates: str  # the probed rates: layer compute ms, a streamed layer's overhead ms, head ms, read GB/s, read
        # compute share
    command: str  # the command line that wrote the row
    run_id: str  # the invocation


def build_parser():
    parser = bench.build_parser("diskoffload", description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    parser.add_argument("--budget-share", type=float, default=None, metavar="F",
                        help="the device budget as this share of the model's bytes (0 < F <= 1), instead of "
                             "--device-budget")
    parser.add_argument("--rounds", type=bench.int_at_least(1), default=3,
                        help="timed rounds, each configuration once per round (after one untimed round)")
    parser.set_defaults(out=DEFAULT_OUT, max_new_tokens=16)
    return parser


def finish(args):
    if (args.budget_share is None) == (args.device_budget is None):
        raise bench.UsageError("give one of --device-budget SIZE and --budget-share F")
    if args.budget_share is not None and not 0 < args.budget_share <= 1:
        raise bench.UsageError(f"--budget-share {args.budget_share}: must be in (0, 1]")
    args.device_budget, share = args.device_budget or 1, args.budget_share  # checked now, set once loaded
    args = bench.finish_args(args, FitRow)
    args.device_budget = None if share is not None else args.device_budget
    return args


def configurations(plan: offload_skip.Plan, device) -> dict[str, offload_skip.Candidate]:
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
    return configs


def config_of(c: offload_skip.Candidate, n_layers: int, args) -> offload_skip.OffloadConfig:
    mapped = c.cpu_read == "map"  # a mapped layer is read once: never cold, never throttled
    return c.config(n_layers, cold=args.cold and not mapped, io_bandwidth=None if mapped else args.io_bandwidth)


def time_rounds(run_, store, configs: dict, args) -> tuple[dict, dict, list]:
    """decode tok/s per round and the peak bytes of each configuration, interleaved."""
    n = len(offload_skip.find_decoder_layers(run_.model))
    names = list(configs)
    speeds, peaks = {k: [] for k in names}, dict.fromkeys(names, 0)
    total = (args.rounds + 1) * len(names)
    with bench.measure.watch_cpu() as load, tqdm(total=total, desc="fit rounds", unit="config") as bar:
        for r in range(args.rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                ctl = offload_skip.patch_model(run_.model, list(range(n)), bench.experiment.layers_dir(args),
                                               config=config_of(configs[name], n, args), store=store, progress=False)
                try:
                    ctl.reset_stats()
                    timing = bench.decode(run_.model, run_.input_ids, args.max_new_tokens,
                                          context=bench.inference(ctl), attention_mask=run_.attention_mask)
                    peaks[name] = max(peaks[name], ctl.stats()["peak_resident_bytes"])
                finally:
                    ctl.unpatch(restore=False)
                if r:  # the first round warms every configuration up
                    speeds[name].append(run_.input_ids.shape[0] * (args.max_new_tokens - 1) / timing.decode_s)
                bar.update()
    return speeds, peaks, load


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
    plan = bench.planning.plan_for(run_, shape, f"device budget {budget:,} bytes")
    rates = plan.rates
    print(plan, flush=True)
    configs = configurations(plan, device)
    speeds, peaks, load = time_rounds(run_, store, configs, args)
    rows = make_rows(run_, args, configs, speeds, peaks, load[0], budget, model_bytes, kv, context, rates)
    for row in rows:
        print(f"  {row.config:<26} {row.decode_tok_s:7.2f} tok/s (predicted {row.predicted_decode_tok_s:7.2f}), "
              f"peak {row.peak_bytes / 2**20:7.1f} MiB + KV {kv / 2**20:.1f} MiB "
              f"{'fits' if row.fits else 'OVER the budget'}{'  <- fastest that fits' if row.fastest_fitting else ''}")
    path = bench.save_rows(args.out, rows, args.row_file)
    print(f"  {bench.rows.saved_line(path, args)}")
    return rows


def make_rows(run_, args, configs, speeds, peaks, load, budget, model_bytes, kv, context, rates) -> list[FitRow]:
    median = {k: statistics.median(v) for k, v in speeds.items()}
    fitting = [k for k in configs if peaks[k] + kv <= budget]
    fastest = max(fitting, key=median.get) if fitting else None
    case_id = f"{args.model}-{run_.info['quant']}-{budget}-{'cold' if args.cold else 'cached'}-{run_.run_id}"
    rates_text = (f"layer {rates.layer_compute_s * 1e3:.3f} ms, streamed +{rates.stream_overhead_s * 1e3:.3f} ms, "
                  f"head {rates.fixed_compute_s * 1e3:.3f} ms, "
                  f"read {rates.read_Bps / 1e9:.2f} GB/s, share {rates.read_compute_share:.2f}")
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
            embedding_residency="disk" if c.offload_embeddings else "resident",
            predicted_decode_tok_s=predicted, predicted_peak_bytes=c.weights_bytes,
            decode_tok_s=median[name], decode_tok_s_q1=q[0], decode_tok_s_q3=q[2],
            predicted_over_measured=predicted / median[name], peak_bytes=peaks[name],
            fits=peaks[name] + kv <= budget, fastest_fitting=name == fastest,
            plan_over_fastest=median["plan"] / median[fastest] if name == "plan" and fastest else None,
            max_new_tokens=args.max_new_tokens, rounds=args.rounds, other_cpu_share=load.other_cpu_share,
            busy=load.busy, rates=rates_text, command=args.command, run_id=run_.run_id, **bench.environment()))
    return rows


def main(argv: list[str] | None = None) -> int:
    return bench.main(run, build_parser(), argv, finish=finish)


if __name__ == "__main__":
    sys.exit(main())
