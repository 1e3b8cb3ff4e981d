"""Layer importance without training, and what follows from it: ShortGPT's Block Influence
(a one-pass score from hidden states), rank correlation between importance scores, and the
planner's orders (which offloaded layers to skip first)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import offload_skip

from .provenance import environment
from .schema import csv_row


class InfluenceMeter:
    """Block Influence of every decoder layer, BI_i = 1 - mean over tokens of cos(x_i, L_i(x_i))
    (Men et al., ShortGPT, 2024): the layer's input and output hidden states, per token,
    accumulated over every forward run inside ``with meter:``. 0 for a layer that returns its
    input; larger means the layer changes the residual stream more."""

    def __init__(self, model: nn.Module):
        self.layers = offload_skip.find_decoder_layers(model)
        self.cos_sum = [0.0] * len(self.layers)
        self.tokens = [0] * len(self.layers)
        self._handles: list = []

    def __enter__(self) -> "InfluenceMeter":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
            self.cos_sum[i] += cos.sum().item()
            self.tokens[i] += cos.numel()
        return record

    def scores(self) -> list[float]:
        if not all(self.tokens):
            raise RuntimeError("no forward ran inside the meter")
        return [1.0 - c / n for c, n in zip(self.cos_sum, self.tokens)]


@csv_row
class InfluenceRow:
    """One layer's Block Influence: a row of results/block_influence.csv."""
    model: str
    quant: str
    device: str
    device_name: str
    n_layers: int
    layer: int
    block_influence: float
    tokens: int          # tokens whose hidden states were compared
    ppl: float           # the unpatched model's perplexity from the same pass
    ppl_dataset: str
    ppl_ctx: int
    command: str
    run_id: str


def influence_rows(meter: InfluenceMeter, result, command: str) -> list[InfluenceRow]:
    """The rows of one pass; `result` is the pass's Result row (model, device, corpus)."""
    env = environment()
    return [InfluenceRow(result.model, result.quant, result.device, result.device_name, result.n_layers, i, score,
                         meter.tokens[i], result.ppl, result.ppl_dataset, result.ppl_ctx, command, result.run_id, **env)
            for i, score in enumerate(meter.scores())]


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (ties averaged)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long lists of >= 2 values, got {len(a)} and {len(b)}")
    ra, rb = torch.tensor(ranks(a), dtype=torch.float64), torch.tensor(ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom else float("nan")


# --------------------------------------------------------------------------- the planner

NAIVE_ORDERS = ("first", "last", "alternate")


def skip_order(offloaded: list[int], order: str, importance: dict[int, float] | None = None) -> list[int]:
    """The order in which the planner removes offloaded layers (alpha 0, no read), first to go first.

    ``importance``: least important first (ties by index); needs `importance` for every
    offloaded layer. Naive orders: ``first`` (lowest index first), ``last`` (highest
    first), ``alternate`` (every other one, then the rest: 2, 6, 10, ..., 4, 8, ...).
    """
    layers = sorted(offloaded)
    if order == "importance":
        missing = [i for i in layers if importance is None or i not in importance]
        if missing:
            raise ValueError(f"no importance for offloaded layers {missing}")
        return sorted(layers, key=lambda i: (importance[i], i))
    if order == "first":
        return layers
    if order == "last":
        return layers[::-1]
    if order == "alternate":
        return layers[::2] + layers[1::2]
    raise ValueError(f"unknown skip order {order!r}: use importance or one of {', '.join(NAIVE_ORDERS)}")


def skip_counts(n_offloaded: int, points: int = 4) -> list[int]:
    """How many layers a planner curve skips at each point: 0 (stream everything), n (skip
    everything) and `points - 1` steps between, half of n among them."""
    return sorted({round(n_offloaded * k / points) for k in range(points + 1)})


@dataclass(frozen=True)
class PlanPoint:
    order: str
    skipped: tuple[int, ...]
    read_fraction: float  # share of the offloaded layers still read (equal-sized layers: of the bytes)


def plan(offloaded: list[int], orders: dict[str, list[int]], counts: list[int]) -> list[PlanPoint]:
    """Each order's points: its first k layers skipped, for each k in counts."""
    n = len(offloaded)
    return [PlanPoint(name, tuple(sorted(order[:k])), (n - k) / n) for name, order in orders.items() for k in counts]
