"""bench/importance.py: Block Influence against a hand computation, rank correlation, and the
planner's orders and points on made-up importances."""
import math

import pytest
import torch
from conftest import ARCHS, tiny_model
from torch import nn

from bench import importance
from bench.importance import InfluenceMeter, PlanPoint


class Identity(nn.Module):
    """A decoder layer that returns its input: its Block Influence is 0."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _ids(batch, seq, seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, 96, (batch, seq))


# --------------------------------------------------------------------------- InfluenceMeter

@pytest.mark.parametrize("arch, identity_layer", [("llama", 3), ("qwen2", 0), ("gemma3", 7)])
def test_identity_layer_scores_zero(arch, identity_layer):
    model = tiny_model(arch)
    model.model.layers[identity_layer] = Identity()
    meter = InfluenceMeter(model)
    with meter, torch.no_grad():
        model(input_ids=_ids(2, 9), use_cache=False)
    scores = meter.scores()
    assert len(scores) == len(model.model.layers) == 8
    assert abs(scores[identity_layer]) < 1e-6  # cos(x, x) is 1 up to rounding
    assert all(s > 0 for i, s in enumerate(scores) if i != identity_layer)


@pytest.mark.parametrize("shapes, tokens", [
    ([(2, 9)], 18),
    ([(1, 5)], 5),
    ([(2, 9), (1, 5)], 23),
    ([(3, 4), (3, 4), (1, 1)], 25),
])
def test_tokens_count_every_forward_inside_the_meter(shapes, tokens):
    model = tiny_model("llama")
    meter = InfluenceMeter(model)
    with torch.no_grad():
        model(input_ids=_ids(1, 6), use_cache=False)  # before entering: not counted
        with meter:
            for seed, (batch, seq) in enumerate(shapes):
                model(input_ids=_ids(batch, seq, seed), use_cache=False)
    assert meter.tokens == [tokens] * 8
    scores = meter.scores()
    # after the block the hooks are gone: a forward changes nothing
    with torch.no_grad():
        model(input_ids=_ids(2, 7), use_cache=False)
    assert meter.tokens == [tokens] * 8
    assert meter.scores() == scores
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_meter_accumulates_over_two_blocks():
    model = tiny_model("llama")
    meter = InfluenceMeter(model)
    with torch.no_grad():
        with meter:
            model(input_ids=_ids(2, 5), use_cache=False)
        with meter:
            model(input_ids=_ids(1, 3), use_cache=False)
    assert meter.tokens == [13] * 8
    assert all(not layer._forward_hooks for layer in model.model.layers)


@pytest.mark.parametrize("forward_outside", [False, True])
def test_scores_need_a_forward_inside_the_meter(forward_outside):
    model = tiny_model("llama")
    meter = InfluenceMeter(model)
    with meter:
        pass
    if forward_outside:
        with torch.no_grad():
            model(input_ids=_ids(1, 4), use_cache=False)
    with pytest.raises(RuntimeError, match="^no forward ran inside the meter$"):
        meter.scores()


@pytest.mark.parametrize("arch, layer", [(arch, layer) for arch in ARCHS for layer in (1, 5)])
def test_score_by_hand(arch, layer):
    """BI = 1 - mean over every token of every forward of cos(layer input, layer output),
    from our own hooks and a float64 cosine."""
    model = tiny_model(arch)
    seen = []

    def capture(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        seen.append((x.detach().clone(), y.detach().clone()))

    handle = model.model.layers[layer].register_forward_hook(capture, with_kwargs=True)
    meter = InfluenceMeter(model)
    with meter, torch.no_grad():
        model(input_ids=_ids(2, 9), use_cache=False)
        model(input_ids=_ids(1, 6, seed=2), use_cache=False)
    handle.remove()
    assert [x.shape[:2] for x, _ in seen] == [(2, 9), (1, 6)]
    cosines = []
    for x, y in seen:
        x, y = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
        cosines += ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).tolist()
    assert len(cosines) == meter.tokens[layer] == 24
    expected = 1 - sum(cosines) / len(cosines)
    assert meter.scores()[layer] == pytest.approx(expected, abs=1e-6)
    assert expected > 0


# --------------------------------------------------------------------------- ranks / spearman

@pytest.mark.parametrize("values, expected", [
    ([], []),
    ([5.0], [1.0]),
    ([3, 1, 2], [3.0, 1.0, 2.0]),
    ([1, 2, 2, 3], [1.0, 2.5, 2.5, 4.0]),
    ([7, 7, 7], [2.0, 2.0, 2.0]),
    ([2, 1, 2, 1], [3.5, 1.5, 3.5, 1.5]),
    ([0.5, -1.0, 0.5, 9.0, 0.5], [3.0, 1.0, 3.0, 5.0, 3.0]),
])
def test_ranks(values, expected):
    assert importance.ranks(values) == expected


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [10, 20, 30], 1.0),                       # identical orders
    ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], -1.0),             # reversed
    ([1, 2, 3, 4], [math.exp(v) for v in (1, 2, 3, 4)], 1.0),  # ranks only: any increasing map
    ([1, 2, 3, 4], [1, 3, 2, 4], 0.8),                    # 1 - 6 * 2 / (4 * 15)
    ([1, 2, 2, 3], [1, 2, 3, 4], math.sqrt(0.9)),         # ties averaged: 4.5 / sqrt(4.5 * 5)
    ([1.0, 2.0], [2.0, 1.0], -1.0),
])
def test_spearman(a, b, expected):
    assert importance.spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert importance.spearman(b, a) == pytest.approx(expected, abs=1e-12)


def test_spearman_of_a_constant_list_is_nan():
    assert math.isnan(importance.spearman([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize("a, b, message", [
    ([1, 2, 3], [1, 2], "need two equally long lists of >= 2 values, got 3 and 2"),
    ([1], [2, 3], "got 1 and 2"),
    ([1], [1], "need two equally long lists of >= 2 values, got 1 and 1"),
    ([], [], "got 0 and 0"),
])
def test_spearman_errors(a, b, message):
    with pytest.raises(ValueError, match=message):
        importance.spearman(a, b)


# --------------------------------------------------------------------------- the planner

OFFLOADED = [2, 4, 6, 8, 10]


@pytest.mark.parametrize("offloaded, order, scores, expected", [
    (OFFLOADED, "first", None, [2, 4, 6, 8, 10]),
    ([10, 2, 8, 4, 6], "first", None, [2, 4, 6, 8, 10]),  # the input's order does not matter
    (OFFLOADED, "last", None, [10, 8, 6, 4, 2]),
    (OFFLOADED, "alternate", None, [2, 6, 10, 4, 8]),
    ([2, 4, 6, 8], "alternate", None, [2, 6, 4, 8]),
    ([5], "alternate", None, [5]),
    (OFFLOADED, "importance", {2: 5.0, 4: 1.0, 6: 3.0, 8: 2.0, 10: 4.0}, [4, 8, 6, 10, 2]),
    # ties by index; layers that are not offloaded are ignored
    (OFFLOADED, "importance", {2: 1.0, 4: 0.5, 6: 1.0, 8: 0.5, 10: 1.0, 3: 0.0}, [4, 8, 2, 6, 10]),
    (OFFLOADED, "importance", {i: 7.0 for i in OFFLOADED}, [2, 4, 6, 8, 10]),
    (OFFLOADED, "importance", {2: -1.0, 4: 3.0, 6: -2.0, 8: 3.0, 10: 0.0}, [6, 2, 10, 4, 8]),
])
def test_skip_order(offloaded, order, scores, expected):
    assert importance.skip_order(offloaded, order, scores) == expected


@pytest.mark.parametrize("order, scores, message", [
    ("importance", {2: 1.0, 6: 1.0, 10: 1.0}, "no importance for offloaded layers [4, 8]"),
    ("importance", None, "no importance for offloaded layers [2, 4, 6, 8, 10]"),
    ("importance", {}, "no importance for offloaded layers [2, 4, 6, 8, 10]"),
    ("random", None, "unknown skip order 'random': use importance or one of first, last, alternate"),
    ("First", None, "unknown skip order 'First'"),
])
def test_skip_order_errors(order, scores, message):
    with pytest.raises(ValueError) as err:
        importance.skip_order(OFFLOADED, order, scores)
    assert message in str(err.value)


@pytest.mark.parametrize("n, points, expected", [
    # round() rounds halves to even: 10 * 1/4 = 2.5 -> 2, 10 * 3/4 = 7.5 -> 8
    (10, 4, [0, 2, 5, 8, 10]),
    (13, 4, [0, 3, 6, 10, 13]),  # 3.25 -> 3, 6.5 -> 6, 9.75 -> 10
    (16, 4, [0, 4, 8, 12, 16]),
    (15, 4, [0, 4, 8, 11, 15]),  # 3.75, 7.5, 11.25
    (5, 4, [0, 1, 2, 4, 5]),     # 1.25, 2.5, 3.75
    (2, 4, [0, 1, 2]),           # 0.5 -> 0, 1, 1.5 -> 2: repeated counts appear once
    (1, 4, [0, 1]),
    (0, 4, [0]),
    (13, 3, [0, 4, 9, 13]),      # 4.33, 8.67
    (10, 1, [0, 10]),
    (10, 2, [0, 5, 10]),
])
def test_skip_counts(n, points, expected):
    assert importance.skip_counts(n, points) == expected


def test_skip_counts_default_points():
    assert importance.skip_counts(10) == [0, 2, 5, 8, 10]


def test_plan():
    offloaded = [2, 4, 6, 8]
    orders = {"by-score": [6, 2, 8, 4], "last": [8, 6, 4, 2]}
    assert importance.plan(offloaded, orders, [0, 1, 2, 4]) == [
        PlanPoint("by-score", (), 1.0),
        PlanPoint("by-score", (6,), 0.75),
        PlanPoint("by-score", (2, 6), 0.5),
        PlanPoint("by-score", (2, 4, 6, 8), 0.0),
        PlanPoint("last", (), 1.0),
        PlanPoint("last", (8,), 0.75),
        PlanPoint("last", (6, 8), 0.5),
        PlanPoint("last", (2, 4, 6, 8), 0.0),
    ]


@pytest.mark.parametrize("order", ["first", "last", "alternate", "importance"])
def test_plan_of_each_order(order):
    offloaded = list(range(2, 28, 2))  # 13 layers
    scores = {i: float((i * 7) % 13) for i in offloaded}
    skip = importance.skip_order(offloaded, order, scores)
    counts = importance.skip_counts(len(offloaded))
    points = importance.plan(offloaded, {order: skip}, counts)
    assert [p.order for p in points] == [order] * len(counts)
    assert [p.skipped for p in points] == [tuple(sorted(skip[:k])) for k in counts]
    assert [p.read_fraction for p in points] == [(13 - k) / 13 for k in counts]
    assert points[0].skipped == () and points[-1].skipped == tuple(offloaded)
