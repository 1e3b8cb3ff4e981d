"""Perplexity of a variant on a corpus; also imported by the run_*.py scripts.

Protocol (GPTQ/AWQ/SLEB windows, Hugging Face perplexity guide for overlap): the documents
are joined with "\\n\\n" and tokenized once; the first max_tokens tokens are kept; windows
of ctx tokens start every stride tokens; in each window only tokens not scored by an
earlier window are scored (stride = ctx: every token but a window's first); PPL =
exp(mean NLL over all scored tokens). ``--ppl-dataset short`` scores each text on its own,
the original experiment's style, and pools the NLL of all texts.

    python eval_ppl.py --variant kvcache            # appends a row to results/ppl.csv
    python eval_ppl.py --block-influence            # + every layer's Block Influence, same pass
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bench
from bench import importance


def token_ids(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """The first max_tokens token ids (all if None) of the documents joined with "\\n\\n", 1-D.

    Equal to tokenizing the whole joined text once and truncating. Only a prefix is
    tokenized, grown until it yields a margin of tokens beyond max_tokens: the tokenizers
    used here split text locally (words, bytes), so tokens far before the cut are the same
    as with the whole text, and the whole corpus (1.8 M characters) is not tokenized to
    keep 8 k tokens.
    """
    text = "\n\n".join(docs)
    margin = 64
    if max_tokens:
        n_chars = 8 * (max_tokens + margin)
        while n_chars < len(text):
            ids = tokenizer(text[:n_chars], return_tensors="pt").input_ids[0]
            if len(ids) > max_tokens + margin:
                return ids[:max_tokens]
            n_chars *= 2
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window: tokens begin..end-1 go in, tokens
    first_scored..end-1 are scored (predicted from the tokens before them in the window)."""
    if stride < 1 or stride > ctx:
        raise ValueError(f"stride must be in 1..ctx ({ctx}), got {stride}")
    spans, scored_to = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        first = max(scored_to, begin + 1)  # a window's first token has nothing to be predicted from
        if first < end:
            spans.append((begin, end, first))
        scored_to = end
        if end == n_tokens:
            break
    return spans


def nll_sum(model, ids: torch.Tensor, ctx: int, stride: int, progress: bool = True) -> tuple[float, int]:
    """(sum of NLL in nats, tokens scored) of a 1-D id sequence under the window protocol."""
    device = model.device
    total, count = 0.0, 0
    spans = windows(len(ids), ctx, stride)
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", leave=False,
                                  disable=not progress or len(spans) < 2):
        window = ids[begin:end].to(device)[None]
        with torch.no_grad():
            logits = model(input_ids=window, use_cache=False).logits[0]
        # logits[k] predicts token begin+k+1: keep the predictions of tokens first..end-1.
        predicting = logits[first - begin - 1: end - begin - 1].float()
        targets = window[0, first - begin:]
        total += F.cross_entropy(predicting, targets, reduction="sum").item()
        count += end - first
    return total, count


def perplexity(model, tokenizer, docs: list[str], ctx: int, stride: int | None = None,
               max_tokens: int | None = None, separate: bool = False, progress: bool = True) -> tuple[float, int]:
    """(PPL, tokens scored). separate=True scores each document on its own (max_tokens
    then caps the tokens taken over all documents, in order)."""
    stride = stride or ctx
    if separate:
        sequences, left = [], max_tokens
        for doc in docs:
            ids = token_ids(tokenizer, [doc], left)
            sequences.append(ids)
            if left:
                left -= len(ids)
                if left <= 0:
                    break
    else:
        sequences = [token_ids(tokenizer, docs, max_tokens)]
    total, count = 0.0, 0
    for ids in sequences:
        nll, n = nll_sum(model, ids, ctx, stride, progress)
        total, count = total + nll, count + n
    if count == 0:
        raise bench.UsageError("the corpus gives no token to score (it needs at least 2 tokens)")
    return math.exp(total / count), count


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    n_tokens: int
    dataset: str
    ctx: int
    stride: int
    peak_bytes: int | None  # controller's peak during the evaluation (None: baseline)


def evaluate(run: bench.Run, ctl=None) -> Perplexity | None:
    """The run's perplexity with its variant's residency (a kvcache session spans the whole
    evaluation); None when --ppl-max-tokens is 0."""
    args = run.args
    if not args.ppl_max_tokens:
        return None
    if ctl is not None:
        ctl.reset_stats()
    with bench.inference(ctl)():
        ppl, n = perplexity(run.model, run.tokenizer, run.docs, args.ppl_ctx, args.ppl_stride,
                            args.ppl_max_tokens, separate=run.ppl_dataset == "short")
    peak = ctl.stats()["peak_resident_bytes"] if ctl is not None else None
    return Perplexity(ppl, n, run.ppl_dataset, args.ppl_ctx, args.ppl_stride, peak)


def run(args) -> bench.Result:
    if not args.ppl_max_tokens:
        raise bench.UsageError("--ppl-max-tokens 0 leaves nothing to evaluate")
    if args.block_influence and args.variant != "baseline":
        raise bench.UsageError("--block-influence scores the unpatched model's layers; use --variant baseline")
    bench.check_output(args.influence_out, importance.InfluenceRow)
    run_ = bench.open_run(args)
    ctl = bench.patch_run(run_)  # --device-budget: the plan's residency (bench.planning)
    unpatched = bench.measure_unpatched(run_, ctl)  # this process's model, unpatched: the row's baseline
    meter = importance.InfluenceMeter(run_.model) if args.block_influence else contextlib.nullcontext()
    with meter:
        ppl = evaluate(run_, ctl)
    memory = bench.measure_memory(run_, ctl)
    row = bench.finish(run_, bench.make_result(run_, ctl, memory, ppl=ppl, baseline_memory=unpatched))
    if args.block_influence:
        bench.append_rows(args.influence_out, list(importance.influence_rows(meter, row, args.command)))
        print(f"  Block Influence of {row.n_layers} layers appended to {args.influence_out}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = bench.build_parser(None, description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    parser.add_argument("--block-influence", action="store_true",
                        help="also score every decoder layer by ShortGPT's Block Influence, "
                             "1 - mean cos(layer input, layer output), in the same pass (baseline only)")
    parser.add_argument("--influence-out", type=Path, default=bench.RESULTS_DIR / "block_influence.csv",
                        help="CSV the Block Influence rows are appended to")
    return bench.main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
