"""Exactness on a real model: the patched model at alpha = 1 against the original.

For each weight format, the original model's logits on a window of real text and its greedy
continuation are compared with the patched model's (session and stream residency), and with
the naive residual form x + (L(x) - x) in the model's precision, which is what lerp avoids,
and on CUDA (bf16, fp32) with the offloaded layers computed by the host CPU (host_compute:
approximate, so its logit gap is what is measured). One row per comparison goes to
results/exactness.csv.

    python check_exact.py                        # embedded SmolLM2-135M: fp32, bf16, nf4
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

import bench
import eval_ppl
import offload_skip


@bench.csv_row
class Exactness:
    model: str
    weights: str | None         # real, or dummy (seeded random values: exactness holds or not all the same); empty: real
    quant: str
    device: str
    device_name: str            # CUDA device name or 'CPU: <model name>': exactness is stated per machine
    layers: str
    form: str                   # session / stream: patch_model at alpha 1; naive: x + (L(x) - x) hooks; host: CUDA,
                                # the offloaded layers computed by the host CPU (approximate)
    window_tokens: int          # logits compared at every position of this window of wiki text
    max_abs_logit_diff: float
    logits_equal: bool          # torch.equal over the whole window
    greedy_tokens: int
    tokens_equal: bool          # greedy continuation of the prompt, KV cache on (model.generate)
    first_divergence: int | None  # index of the first differing new token
    standby_bytes_before: int   # weights on the device, unpatched
    standby_bytes_after: int    # after patch_model + standby()
    saved_bytes: int
    command: str                # the command line that wrote the row: rerun it to reproduce


def _outputs(model, window: torch.Tensor, prompt: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=window, use_cache=False).logits.float()
    return logits, bench.generate(model, prompt, n_tokens)[1]


def _naive_residual_hooks(model, layers: list[int]) -> list:
    """Make each listed layer return x + (L(x) - x) computed in the model's dtype."""
    def hook(module, args, kwargs, output):
        x = kwargs.get("hidden_states", args[0] if args else None)
        return x + (output - x)
    return [offload_skip.find_decoder_layers(model)[i].register_forward_hook(hook, with_kwargs=True)
            for i in layers]


def _window(args, tokenizer, info: dict, window_tokens: int) -> torch.Tensor:
    """[1, window_tokens] ids whose logits are compared: a window of the corpus; for dummy weights,
    which read no text, seeded random ids."""
    if info["weights"] == "dummy":
        generator = torch.Generator().manual_seed(0)
        return torch.randint(len(tokenizer.get_vocab()) or info["vocab_size"], (1, window_tokens), generator=generator)
    docs, _ = bench.load_corpus(args.corpus, args.cache_dir)
    return eval_ppl.token_ids(tokenizer, docs, window_tokens)[None]


def compare(args, quant: str, window_tokens: int, greedy_tokens: int) -> list[Exactness]:
    model, tokenizer, info = bench.load_model(args.model, quant, args.device, args.cache_dir)
    device = next(model.parameters()).device
    window = _window(args, tokenizer, info, window_tokens).to(device)
    prompt = tokenizer(bench.DEFAULT_PROMPT, return_tensors="pt").input_ids.to(device)
    layers = bench.select(args.layers, info["n_layers"])
    before = offload_skip.tensor_bytes(offload_skip.module_tensors(model), device)
    ref_logits, ref_tokens = _outputs(model, window, prompt, greedy_tokens)
    rows = []

    def row(form: str, logits, tokens, after: int) -> Exactness:
        differs = (tokens != ref_tokens)[0].nonzero()
        return Exactness(
            model=info["model"], weights=info["weights"], quant=quant, device=device.type, device_name=bench.device_name(device),
            layers=args.layers, form=form,
            window_tokens=window.shape[1], max_abs_logit_diff=(logits - ref_logits).abs().max().item(),
            logits_equal=torch.equal(logits, ref_logits), greedy_tokens=greedy_tokens,
            tokens_equal=torch.equal(tokens, ref_tokens),
            first_divergence=int(differs[0]) if len(differs) else None,
            standby_bytes_before=before, standby_bytes_after=after, saved_bytes=before - after,
            command=args.command,
            **{k: v for k, v in bench.environment().items() if k in {f.name for f in dataclasses.fields(Exactness)}})

    with tempfile.TemporaryDirectory() as cache:  # fresh layer files: nothing reused from a user cache
        for mode in ("session", "stream"):
            ctl = offload_skip.patch_model(model, layers, cache, mode=mode, progress=False)
            logits, tokens = _outputs(model, window, prompt, greedy_tokens)
            ctl.standby()
            rows.append(row(mode, logits, tokens, ctl.resident_bytes()))
            ctl.unpatch()
        if device.type == "cuda" and quant != "nf4":  # approximate by construction: the gap is the measurement
            ctl = offload_skip.patch_model(model, layers, cache, mode="stream", host_compute=tuple(layers),
                                           progress=False)
            logits, tokens = _outputs(model, window, prompt, greedy_tokens)
            ctl.standby()
            rows.append(row("host", logits, tokens, ctl.resident_bytes()))
            ctl.unpatch()
    hooks = _naive_residual_hooks(model, layers)
    logits, tokens = _outputs(model, window, prompt, greedy_tokens)
    for hook in hooks:
        hook.remove()
    rows.append(row("naive", logits, tokens, before))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = bench.new_parser(Path(__file__).name, __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=bench.DEFAULT_MODEL,
                        help="embedded alias, local directory, hub id or dummy:SHAPE (random ids instead of --corpus)")
    parser.add_argument("--quants", default="fp32,bf16,nf4", help="weight formats to compare, comma-separated")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    parser.add_argument("--layers", default="even", metavar="PATTERN", help="decoder layers to offload")
    parser.add_argument("--cache-dir", type=Path, default=bench.default_cache_dir(),
                        help="where converted embedded models are kept (layer files go to a temporary folder)")
    parser.add_argument("--corpus", default="wiki-embedded", help="text whose logits are compared (name or path)")
    parser.add_argument("--window-tokens", type=int, default=512, help="tokens of wiki text whose logits are compared")
    parser.add_argument("--greedy-tokens", type=int, default=64, help="greedy tokens generated from the prompt")
    parser.add_argument("--out", type=Path, default=bench.RESULTS_DIR / "exactness.csv", help="CSV to append rows to")
    return parser


def run(args) -> None:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    bench.check_output(args.out, Exactness)
    for quant in args.quants.split(","):
        if quant not in bench.QUANTS:
            raise bench.UsageError(f"--quants: unknown format {quant!r}; use {', '.join(bench.QUANTS)}")
        for result in compare(args, quant, args.window_tokens, args.greedy_tokens):
            print(f"{result.quant:>5} {result.form:<8} max|dlogit| {result.max_abs_logit_diff:<10.4g} "
                  f"logits equal {result.logits_equal!s:<5} greedy equal {result.tokens_equal!s:<5} "
                  f"(first divergence {result.first_divergence}); saved {result.saved_bytes / 1e6:.1f} MB "
                  f"of {result.standby_bytes_before / 1e6:.1f} MB")
            bench.append_rows(args.out, [result])
    print(f"  rows appended to {args.out}")


def main(argv=None) -> int:
    return bench.main(run, build_parser(), argv, finish=None)


if __name__ == "__main__":
    raise SystemExit(main())
