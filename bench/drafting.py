"""Speculative decoding over stream residency, measured: run_diskoffload.py --draft KIND.

The draft (--draft) is built here from the run (a sibling model, the target's own substitutes,
or prompt lookup); then, over a prompt set (--prompts), the patched target is timed three
ways, interleaved prompt by prompt in one process: plain stream decoding, speculative
decoding over the same stream, and the unpatched (resident) model. Exactness is checked
against plain stream decoding's tokens (one token per forward); where they differ, the
target's top-2 logit gap at that position is measured, so a flipped near-tie is shown as one.
One row per run: ``SpeculativeRow``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import offload_skip
import speculative

from .base import UsageError
from .dummy import is_dummy
from .experiment import Run, inference, prompt_batch
from .measure import decode, settle, synchronize, unpatched_fits, watch_cpu
from .models import QUANTS, load_model, model_kind
from .prompts import PROMPT_KINDS, load_prompts
from .provenance import device_name, environment
from .schema import csv_row
from .rowfiles import save_rows
from .rows import saved_line

SCHEDULES = {"adaptive": speculative.AdaptiveSchedule, "constant": speculative.ConstantSchedule}
SELF_DRAFTS = tuple(f"self:{kind}" for kind in speculative.SUBSTITUTE_KINDS)
DRAFT_HELP = (f"speculative decoding: none, lookup (prompt lookup), {', '.join(SELF_DRAFTS)} (the target with a "
              "resident low-bit substitute for each streamed layer; self = self:nf4), or a model with the target's "
              "tokenizer (embedded alias, directory, hub id) kept resident in --draft-quant")


def add_arguments(parser: argparse.ArgumentParser, prompt_sets: bool = True) -> None:
    """--draft and its flags; prompt_sets: --prompts and --prompt-count too (run_fit.py times --prompt alone)."""
    group = parser.add_argument_group("speculative decoding (diskoffload --draft)")
    group.add_argument("--draft", default="none", metavar="KIND", help=DRAFT_HELP)
    group.add_argument("--draft-quant", choices=QUANTS, default=None,
                       help="weight format of a --draft model (default: --quant)")
    group.add_argument("--draft-tokens", type=int, default=None, metavar="N",
                       help=f"most tokens drafted per verify (default: transformers' "
                            f"{speculative.DEFAULT_DRAFT_TOKENS}, a model draft stopping where its top probability < "
                            f"{speculative.DEFAULT_CONFIDENCE}; "
                            f"lookup: {speculative.LOOKUP_TOKENS})")
    group.add_argument("--draft-schedule", choices=SCHEDULES, default="adaptive",
                       help="adaptive (default): ask the draft only while this run's timings say drafting is faster "
                            "than plain steps; constant: ask for --draft-tokens at every verify (transformers')")
    if not prompt_sets:
        parser.set_defaults(prompts=None, prompt_count=8)
        return
    group.add_argument("--prompts", choices=PROMPT_KINDS, default=None,
                       help="decode a prompt set instead of --prompt: code (HumanEval) or wiki (Wikipedia openings)")
    group.add_argument("--prompt-count", type=int, default=8, metavar="N", help="prompts of --prompts decoded")


def check_arguments(args: argparse.Namespace) -> None:
    """The --draft flags' own checks (argparse cannot make them): one-line UsageErrors."""
    draft = args.draft = "self:nf4" if args.draft == "self" else args.draft
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise UsageError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.prompt_count < 1:
        raise UsageError(f"--prompt-count must be >= 1, got {args.prompt_count}")
    if draft == "none":
        return
    if is_dummy(args.model):
        raise UsageError(f"--draft over {args.model}: dummy weights accept no draft's tokens in any meaningful "
                         "way; speculative decoding needs real weights")
    if args.batch_size != 1:
        raise UsageError("--draft decodes one sequence at a time: drop --batch-size")
    if not args.kv_cache:
        raise UsageError("--draft verifies from the KV cache: drop --no-kv-cache")
    if draft.startswith("self:") and draft not in SELF_DRAFTS:
        raise UsageError(f"--draft {draft}: unknown substitute; choose from {', '.join(SELF_DRAFTS)}")
    if draft not in ("lookup", *SELF_DRAFTS):
        model_kind(draft)  # an unknown alias fails now, with the aliases named
    if args.draft_quant is None:
        args.draft_quant = args.quant


def make_drafter(run: Run, ctl) -> speculative.Drafter:
    args = run.args
    if args.draft == "lookup":
        return speculative.LookupDrafter(max_tokens=args.draft_tokens or speculative.LOOKUP_TOKENS)
    if args.draft in SELF_DRAFTS:
        try:
            substitutes = speculative.build_substitutes(ctl, args.draft.split(":")[1], args.cache_dir / "drafts")
        except ValueError as err:
            raise UsageError(f"--draft {args.draft}: {err}") from None
        return speculative.SelfDrafter(run.model, substitutes, ctl.offloaded_layers, name=args.draft)
    model, tokenizer, _ = load_model(args.draft, args.draft_quant, args.device, args.cache_dir)
    if tokenizer.get_vocab() != run.tokenizer.get_vocab():
        raise UsageError(f"--draft {args.draft}: its tokenizer is not the target's ({args.model}); "
                         "a draft must propose the target's token ids")
    return speculative.ModelDrafter(model, name=args.draft)


@csv_row
class SpeculativeRow:
    """One --draft run over one prompt set: speculative decoding against plain stream decoding
    and the resident model, timed interleaved in one process."""
    model: str
    quant: str
    device: str
    device_name: str
    layers_offloaded: str
    draft: str                   # lookup, self:<kind>, or the draft model's name
    draft_quant: str | None      # a draft model's weight format
    draft_layers: str            # self drafts: the streamed layers with a substitute
    draft_tokens: str            # the cap per verify, or "auto" (transformers' 20; lookup 10)
    schedule: str                # adaptive or constant (rows without one: constant)
    prompt_kind: str             # code, wiki, or "prompt" (--prompt alone)
    prompts: int
    max_new_tokens: int
    repeats: int
    cpu_read: str | None
    prefetch: int
    cold_reads: bool
    draft_bytes: int             # resident bytes the draft adds (its KV cache apart)
    substituted_bytes: int | None  # self drafts: stored bytes of the layers it substitutes
    streamed_bytes_per_forward: int
    verify_forwards: int         # target forwards of one pass over the prompts, prefill included
    plain_steps: int             # of those, verifies the schedule ran without asking the draft
    new_tokens: int
    accepted_per_verify: float   # tokens emitted per target forward
    drafted_per_verify: float    # draft tokens proposed per verify forward
    acceptance: float | None     # accepted / drafted
    draft_ms_per_verify: float | None
    verify_ms: float | None      # per verify forward
    read_bytes_per_token: float  # streamed-layer bytes per generated token: each target forward reads them once
    plain_read_bytes_per_token: float
    decode_tok_s: float          # new tokens after the first, over the time after the prompt's forward
    plain_decode_tok_s: float
    vs_plain: float
    resident_decode_tok_s: float | None
    vs_resident: float | None
    tokens_equal: bool           # every prompt's tokens equal plain stream decoding's
    prompts_differing: int
    first_diff: str              # prompt@position of each difference
    max_diff_gap: float | None   # largest top-2 logit gap of the target where a token differs
    other_cpu_share: float | None
    busy: bool | None
    run_id: str
    command: str


def _prompts(run: Run) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    args = run.args
    if args.prompts is None:
        return "prompt", [("prompt", run.input_ids)]
    chosen = load_prompts(args.prompts, args.prompt_count, args.cache_dir)
    return args.prompts, [(p.name, prompt_batch(run.tokenizer, p.text)[0].to(run.device)) for p in chosen]


def make_schedule(args: argparse.Namespace) -> speculative.ConstantSchedule:
    """One schedule for the whole run: an adaptive one keeps what it learned across prompts and
    repeats (the warm-up included), as a long-running decoder would."""
    return SCHEDULES[args.draft_schedule](args.draft_tokens or speculative.DEFAULT_DRAFT_TOKENS)


def timed_speculative(run: Run, ctl, drafter, schedule, ids: torch.Tensor):
    """(decode seconds after the prompt's forward, Decoded), inside the variant's inference
    block like decode() times it (entered inside the timer, left outside)."""
    synchronize(run.device)
    start = time.perf_counter()
    with inference(ctl)():
        out = speculative.speculative_decode(run.model, ids, run.args.max_new_tokens, drafter, schedule=schedule)
        synchronize(run.device)
        total_s = time.perf_counter() - start
    return total_s - out.prefill_s, out


@dataclass
class DraftTimings:
    """What the timed rounds recorded, per prompt name: decode seconds of speculative, plain
    stream and (when it fits) unpatched decoding, the speculative outputs, the plain tokens."""
    resident: bool
    spec_s: dict[str, list[float]]
    plain_s: dict[str, list[float]]
    resident_s: dict[str, list[float]]
    outs: dict[str, list]
    plain_tokens: dict[str, list]
    cpu: list = field(default_factory=list)  # watch_cpu's reading over the timed rounds


def measure_drafts(run: Run, ctl, drafter) -> SpeculativeRow:
    """Time `drafter` against plain stream decoding (and the unpatched model where it fits) over
    the prompts, then compare each prompt's tokens with plain decoding's."""
    kind, prompts = _prompts(run)
    schedule = make_schedule(run.args)
    timings = time_rounds(run, ctl, drafter, schedule, prompts)
    settle(run, ctl)
    first = {name: runs[0] for name, runs in timings.outs.items()}
    differing = _differences(run, ctl, prompts, first, timings.plain_tokens)
    return _draft_row(run, ctl, drafter, schedule, (kind, len(prompts)), timings, first, differing)


def time_rounds(run: Run, ctl, drafter, schedule, prompts) -> DraftTimings:
    """--warmup untimed rounds over the first prompt, then --repeats timed rounds over every
    prompt: each round the unpatched model (if it fits), plain stream decoding, the draft."""
    args, model, n = run.args, run.model, run.args.max_new_tokens
    resident = unpatched_fits(run, ctl)
    timings = DraftTimings(resident, *({name: [] for name, _ in prompts} for _ in range(5)))
    bar = tqdm(total=(args.warmup + args.repeats * len(prompts)) * (3 if resident else 2), unit="run",
               desc=f"timing draft {drafter.name}", leave=False)

    def step(what, fn, *fn_args):
        bar.set_postfix_str(what, refresh=True)
        result = fn(*fn_args)
        bar.update()
        return result

    def one_round(name, ids, record):
        if resident:
            with ctl.unpatched(release=False):
                unpatched = step(f"{name}, unpatched", decode, model, ids, n)
        plain = step(f"{name}, plain stream", decode, model, ids, n, True, inference(ctl))
        seconds, out = step(f"{name}, draft {drafter.name}", timed_speculative, run, ctl, drafter, schedule, ids)
        if record:
            timings.spec_s[name].append(seconds)
            timings.outs[name].append(out)
            timings.plain_s[name].append(plain.decode_s)
            timings.plain_tokens[name].append(plain.tokens)
            if resident:
                timings.resident_s[name].append(unpatched.decode_s)

    for _ in range(args.warmup):
        one_round(*prompts[0], record=False)
    with watch_cpu() as cpu:
        for _ in range(args.repeats):
            for name, ids in prompts:
                one_round(name, ids, record=True)
    bar.close()
    timings.cpu = cpu
    return timings


def _differences(run: Run, ctl, prompts, first: dict, plain_tokens: dict) -> list[tuple[str, int, float]]:
    """(prompt, position, the target's top-2 logit gap there) where the draft's first output
    differs from plain decoding's."""
    differing = []
    for name, ids in prompts:
        position = speculative.first_difference(first[name].tokens, plain_tokens[name][0])
        if position is not None:  # how near a tie the target's choice was there, decoding plainly (untimed)
            with inference(ctl)():
                _, gaps = speculative.greedy_reference(run.model, ids, position + 1)
            differing.append((name, position, gaps[position]))
    return differing


def _tok_s(seconds: dict, n: int) -> float | None:
    """The prompts' median decode times summed, as tokens/s of the n - 1 tokens after each prompt's."""
    total = sum(statistics.median(s) for s in seconds.values() if s)
    return (n - 1) * len(seconds) / total if total else None


def _draft_row(run: Run, ctl, drafter, schedule, prompt_set: tuple[str, int], timings: DraftTimings, first: dict,
               differing: list) -> SpeculativeRow:
    """The row: the draft's settings, its counts from the first timed round, the speeds."""
    args, n = run.args, run.args.max_new_tokens
    forwards = sum(o.target_forwards for o in first.values())
    verifies = forwards - len(first)
    drafted = sum(o.drafted for o in first.values())
    streamed = ctl.read_bytes_per_forward()
    new_tokens = n * len(first)
    speed, plain = _tok_s(timings.spec_s, n), _tok_s(timings.plain_s, n)
    res = _tok_s(timings.resident_s, n) if timings.resident else None
    layers = getattr(drafter, "substitutes", None)
    return SpeculativeRow(
        model=run.info["model"], quant=run.info["quant"], device=run.device.type, device_name=device_name(run.device),
        layers_offloaded=" ".join(map(str, ctl.offloaded_layers)), draft=drafter.name,
        draft_quant=args.draft_quant if drafter.name not in ("lookup", *SELF_DRAFTS) else None,
        draft_layers=" ".join(map(str, sorted(layers))) if layers is not None else "",
        draft_tokens=str(args.draft_tokens) if args.draft_tokens else "auto", schedule=schedule.name,
        prompt_kind=prompt_set[0], prompts=prompt_set[1],
        max_new_tokens=n, repeats=args.repeats, cpu_read=ctl.cpu_read, prefetch=ctl.prefetch, cold_reads=bool(args.cold),
        draft_bytes=drafter.resident_bytes,
        substituted_bytes=sum(ctl.layer_bytes[i] for i in layers) if layers is not None else None,
        streamed_bytes_per_forward=streamed, verify_forwards=forwards,
        plain_steps=sum(o.plain_steps for o in first.values()), new_tokens=new_tokens,
        accepted_per_verify=new_tokens / forwards, drafted_per_verify=drafted / verifies if verifies else 0.0,
        acceptance=sum(o.accepted for o in first.values()) / drafted if drafted else None,
        draft_ms_per_verify=1e3 * sum(o.draft_s for o in first.values()) / verifies if verifies else None,
        verify_ms=1e3 * sum(o.verify_s for o in first.values()) / verifies if verifies else None,
        read_bytes_per_token=streamed * forwards / new_tokens, plain_read_bytes_per_token=float(streamed),
        decode_tok_s=speed, plain_decode_tok_s=plain, vs_plain=speed / plain,
        resident_decode_tok_s=res, vs_resident=speed / res if res else None,
        tokens_equal=not differing, prompts_differing=len(differing),
        first_diff=" ".join(f"{name}@{position}" for name, position, _ in differing),
        max_diff_gap=max((gap for *_, gap in differing), default=None),
        other_cpu_share=timings.cpu[0].other_cpu_share, busy=timings.cpu[0].busy, run_id=run.run_id,
        command=getattr(args, "command", ""), **environment())


def summary(row: SpeculativeRow) -> str:
    cpu = f" ({row.device_name})" if row.device == "cpu" else ""
    reads = "cold reads" if row.cold_reads else "page cache"
    lines = [
        f"draft {row.draft}: {row.model} {row.quant} on {row.device}{cpu}, {len(row.layers_offloaded.split())} layers "
        f"streamed ({reads}, prefetch {row.prefetch}), {row.prompts} {row.prompt_kind} prompt(s) x {row.max_new_tokens} "
        f"tokens",
        f"  decode            {row.decode_tok_s:.3g} tok/s  ({row.vs_plain:.2f}x plain stream decoding's "
        f"{row.plain_decode_tok_s:.3g} tok/s, same run"
        + (f"; {row.vs_resident:.2f}x the resident model's {row.resident_decode_tok_s:.3g})" if row.vs_resident else ")"),
        f"  per verify        {row.accepted_per_verify:.2f} tokens emitted, {row.drafted_per_verify:.2f} drafted"
        + (f", {row.acceptance:.0%} of drafted accepted" if row.acceptance is not None else "")
        + (f"; {row.plain_steps} of {row.verify_forwards} target forwards were plain steps ({row.schedule} "
           "schedule: drafting judged slower)" if row.plain_steps else ""),
        f"  streamed bytes    {row.read_bytes_per_token / 1e6:.1f} MB per token "
        f"({row.read_bytes_per_token / row.plain_read_bytes_per_token:.2f}x plain's); draft adds "
        f"{row.draft_bytes / 1e6:.1f} MB resident",
        "  tokens            " + ("equal to plain stream decoding on every prompt" if row.tokens_equal else
                                  f"differ on {row.prompts_differing} prompt(s) ({row.first_diff}), the target's "
                                  f"top-2 gap there at most {row.max_diff_gap:.3g}"),
    ]
    if row.busy:
        lines.append(f"  warning: other processes used {row.other_cpu_share:.0%} of the CPU meanwhile")
    return "\n".join(lines)


PLANNED_DRAFTS = "lookup or a draft model"  # what --device-budget weighs (a self draft's substitutes would split
# the plan's one run of offloaded layers: not planned)
PROBE_DRAFT_ROUNDS = 3  # timed rounds of the draft probe, after one untimed


def check_planned_draft(args: argparse.Namespace) -> None:
    """--device-budget weighs --draft (run_fit.py): lookup or a draft model, one sequence."""
    if args.draft in SELF_DRAFTS:
        raise UsageError(f"--device-budget weighs {PLANNED_DRAFTS}, not {args.draft}: its substitutes would stand "
                         "inside the plan's run of offloaded layers; use --layers and --budget to run a self draft")


def probe_draft(run: Run, ctl, drafter) -> offload_skip.DraftRates:
    """The draft's yield and cost in ctl's configuration, for offload_skip.plan: speculative
    and plain decoding of the run's prompt, interleaved over PROBE_DRAFT_ROUNDS rounds (after
    one untimed); medians of tokens per verify, drafting's seconds per verify and a verify's
    seconds beyond a plain step's."""
    n, schedule = run.args.max_new_tokens, make_schedule(run.args)
    plain_s, per_verify = [], []
    with watch_cpu() as load:
        for r in range(PROBE_DRAFT_ROUNDS + 1):
            plain = decode(run.model, run.input_ids, n, True, inference(ctl))
            _, out = timed_speculative(run, ctl, drafter, schedule, run.input_ids)
            verifies = out.target_forwards - 1  # the prefill gives the first token
            if r and verifies:
                plain_s.append(plain.decode_s / (n - 1))
                per_verify.append(((n - 1) / verifies, out.draft_s / verifies, out.verify_s / verifies))
    if not per_verify:
        raise UsageError(f"--draft {drafter.name}: the probe decodes too few tokens to verify any; raise "
                         "--max-new-tokens")
    step_s = statistics.median(plain_s)
    tokens, draft_s, verify_s = (statistics.median(v[k] for v in per_verify) for k in range(3))
    draft_model = getattr(drafter, "model", None)
    # its KV cache in its compute dtype (an NF4 model's weights are uint8; its embedding is not)
    kv_per_token = 0 if draft_model is None else offload_skip.kv_bytes_per_token(
        draft_model.config, draft_model.get_input_embeddings().weight.dtype)
    busy = f", busy: others used {load[0].other_cpu_share:.0%}" if load[0].busy else ""
    return offload_skip.DraftRates(drafter.name, tokens_per_verify=tokens, draft_s_per_verify=draft_s,
                                   verify_extra_s=max(verify_s - step_s, 0.0), resident_bytes=drafter.resident_bytes,
                                   kv_bytes_per_token=kv_per_token,
                                   source=f"draft probe: {PROBE_DRAFT_ROUNDS} rounds x {n} tokens{busy}")


def run_drafts(run: Run, ctl) -> SpeculativeRow:
    drafter = make_drafter(run, ctl)
    row = measure_drafts(run, ctl, drafter)
    print(summary(row))
    print(f"  {saved_line(save_rows(run.args.out, [row], run.args.row_file), run.args)}")
    return row
