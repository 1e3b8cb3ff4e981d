"""The study's tables and plots, from the suites' CSVs (sweep.py): the "Findings" blocks of
results/README.md and results/study_*.png. Every number comes from a row.

A row's reference is the unpatched model's perplexity on the same tokens (same model, weight
format, --ppl-max-tokens and ctx): a baseline row of any suite, else a row that is exact by
construction (offloaded at alpha 1, injected at distance 1, nothing skipped).
"""
from __future__ import annotations

from pathlib import Path

import bench
import offload_skip
import sweep
from bench import importance
from reporting.tables import machines, markdown_table, save_figure, suite_rows


def _models(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["model"] for row in rows))


def _ppl(row: dict | None) -> float | None:
    return bench.number(row["ppl"]) if row else None


def _same_tokens(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("model", "quant", "ppl_dataset", "ppl_tokens", "ppl_ctx", "ppl_stride"))


def _exact(row: dict) -> bool:
    return (row["variant"] == "baseline" or (bench.number(row["alpha"]) == 1.0 and not row["skipped_layers"]
            and row["inject_distance"] in ("", "1") and not _adjacent(row["layers_offloaded"])))


def _adjacent(layers: str) -> bool:
    indices = sorted(map(int, layers.split()))
    return any(b == a + 1 for a, b in zip(indices, indices[1:]))


def reference(row: dict, pool: list[dict]) -> float | None:
    """The unpatched perplexity on the row's tokens: a baseline row, else an exact variant row."""
    same = [r for r in pool if _same_tokens(r, row) and _exact(r)]
    same.sort(key=lambda r: r["variant"] != "baseline")
    return _ppl(same[0]) if same else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def _source(rows: list[dict], suite: str) -> str:
    if not rows:
        return f"No rows yet: run `python sweep.py {suite}`."
    commits = sorted({r["commit"] for r in rows})
    scored: dict = {}
    for r in rows:
        scored.setdefault(f"{r['model']} {r['quant']}", set()).add(int(r["ppl_tokens"]))
    tokens = sorted(f"{name}: {min(n)}{'-' + str(max(n)) if len(n) > 1 else ''} tokens" for name, n in scored.items())
    return (f"From results/{suite}.csv ({len(rows)} rows; `python sweep.py {suite}`; {machines(rows)}; "
            f"commit {', '.join(commits)}; {'; '.join(tokens)} of {rows[0]['ppl_dataset']} scored).")


def _find(rows: list[dict], model: str, **match) -> dict | None:
    for row in reversed(rows):
        if row["model"] == model and all(row[k] == v for k, v in match.items()):
            return row
    return None


def _alpha_key(row: dict) -> float | None:
    return bench.number(row["alpha"]) if row["variant"] != "baseline" else None


# --------------------------------------------------------------------------- sections

def alpha_section(rows: list[dict]) -> str:
    if not rows:
        return _source(rows, "alpha")
    lines = []
    for model in _models(rows):
        mine = [r for r in rows if r["model"] == model]
        ref = reference(mine[0], rows)
        cells = [model, str(len(mine[-1]["layers_offloaded"].split()) or ""), _fmt(ref)]
        for alpha in sweep.ALPHAS:
            match = [r for r in mine if r["variant"] == "kvcache" and _alpha_key(r) == alpha]
            cells.append(_fmt(_ppl(match[-1]) if match else None))
        lines.append(cells)
    headers = ["model", "even layers offloaded", "unpatched"] + [f"alpha {a:g}" for a in sweep.ALPHAS]
    return _source(rows, "alpha") + "\n\n" + markdown_table(headers, lines)


def _pattern_label(row: dict) -> str:
    layers = row["layers"]
    if "," in layers:  # an explicit half of the band
        n = int(row["n_layers"])
        first, second = sweep.half_band(n)
        layers = "even, first half" if layers == first else "even, second half" if layers == second else layers
    return layers


def patterns_section(rows: list[dict]) -> str:
    if not rows:
        return _source(rows, "patterns")
    lines = []
    for row in rows:
        ref = reference(row, rows)
        ppl = _ppl(row)
        lines.append([row["model"], _pattern_label(row), f"{len(row['layers_offloaded'].split())}/{row['n_layers']}",
                      _fmt(bench.number(row["alpha"]), ".3g"), _fmt(ppl), _fmt(ref),
                      _fmt(ppl / ref if ppl and ref else None, ".3f") + "x"])
    headers = ["model", "layers", "offloaded", "alpha", "PPL", "unpatched", "PPL / unpatched"]
    return _source(rows, "patterns") + "\n\n" + markdown_table(headers, lines)


def importance_scores(rows: list[dict], influence: list[dict]) -> dict:
    """{model: (removal {layer: ppl}, block influence {layer: score})}."""
    out = {}
    for model in _models(rows):
        removal = {}
        for row in rows:
            layers = row["layers_offloaded"].split()
            if row["model"] == model and row["variant"] != "baseline" and len(layers) == 1:
                removal[int(layers[0])] = _ppl(row)
        bi = {int(r["layer"]): float(r["block_influence"]) for r in influence if r["model"] == model}
        out[model] = (removal, bi)
    return out


def importance_section(rows: list[dict], influence: list[dict]) -> str:
    if not rows:
        return _source(rows, "importance")
    lines = []
    for model, (removal, bi) in importance_scores(rows, influence).items():
        common = sorted(set(removal) & set(bi))
        if len(common) < 2:
            continue
        n = int(next(r["n_layers"] for r in rows if r["model"] == model))
        band = [i for i in common if i in offload_skip.select_layers(n, "every:1")]  # where layers are offloaded
        rho_all = importance.spearman([removal[i] for i in common], [bi[i] for i in common])
        rho_band = importance.spearman([removal[i] for i in band], [bi[i] for i in band]) if len(band) > 1 else None
        base = reference(next(r for r in rows if r["model"] == model), rows)
        least = sorted(common, key=lambda i: removal[i])[:3]
        least_bi = sorted(common, key=lambda i: bi[i])[:3]
        worst = max(common, key=lambda i: removal[i])
        lines.append([model, str(len(common)), _fmt(base), _fmt(rho_all, "+.2f"), _fmt(rho_band, "+.2f"),
                      ", ".join(f"{i} ({removal[i]:.1f})" for i in least),
                      ", ".join(f"{i} ({bi[i]:.3f})" for i in least_bi),
                      f"{worst} ({removal[worst]:.4g})"])
    headers = ["model", "layers scored", "unpatched PPL", "Spearman rho, all layers", "rho, band",
               "least important by removal (PPL without it)", "least by Block Influence (BI)", "most important"]
    return _source(rows, "importance") + "\n\n" + markdown_table(headers, lines)


def planner_curves(rows: list[dict], scores: dict) -> dict:
    """{model: {order: [(read MB per token, PPL, skipped count)]}} from the planner's rows."""
    curves: dict = {}
    for model, by_score in scores.items():
        spec = sweep.STUDY_MODELS.get(model)
        if spec is None:
            continue
        offloaded = offload_skip.select_layers(spec["n_layers"], "even")
        for point in sweep.planner_points(offloaded, by_score):
            row = _find(rows, model, variant="diskoffload", skipped_layers=" ".join(map(str, point.skipped)))
            if row is not None:
                curves.setdefault(model, {}).setdefault(point.order, []).append(
                    (bench.number(row["read_bytes_per_token"]) / 1e6, _ppl(row), len(point.skipped)))
    return curves


def planner_section(rows: list[dict], scores: dict) -> str:
    if not rows:
        return _source(rows, "planner")
    lines = []
    for model, orders in planner_curves(rows, scores).items():
        n = len(offload_skip.select_layers(sweep.STUDY_MODELS[model]["n_layers"], "even"))
        half = round(n / 2)
        for order, points in orders.items():
            by_k = {k: (mb, ppl) for mb, ppl, k in points}
            all_read, none_read = by_k.get(0), by_k.get(n)
            at_half = by_k.get(half)
            lines.append([model, order, _fmt(all_read and all_read[1]), f"{half} of {n}",
                          _fmt(at_half and at_half[0], ".1f"), _fmt(at_half and at_half[1]), _fmt(none_read and none_read[1])])
    headers = ["model", "skip order", "PPL, all streamed (exact)", "skipped at half",
               "MB read per token at half", "PPL at half the bytes", "PPL, all skipped"]
    return _source(rows, "planner") + "\n\n" + markdown_table(headers, lines)


def distance_section(rows: list[dict]) -> str:
    if not rows:
        return _source(rows, "distance")
    lines = []
    for model in _models(rows):
        for alpha in (1.0, 0.5):
            cells = [model, f"{alpha:g}"]
            for k in sweep.DISTANCES:
                row = next((r for r in reversed(rows) if r["model"] == model and _alpha_key(r) == alpha
                            and r["inject_distance"] == str(k)), None)
                cells.append(_fmt(_ppl(row)))
            lines.append(cells)
    headers = ["model", "alpha"] + [f"inject_distance {k}" for k in sweep.DISTANCES]
    return _source(rows, "distance") + "\n\n" + markdown_table(headers, lines)


def _context_label(row: dict) -> str:
    if row["variant"] == "baseline":
        return "unpatched"
    return f"{row['layers']}, alpha {bench.number(row['alpha']):g}"


def context_section(rows: list[dict]) -> str:
    if not rows:
        return _source(rows, "context")
    lines = []
    for model in _models(rows):
        mine = [r for r in rows if r["model"] == model]
        for label in dict.fromkeys(map(_context_label, mine)):
            cells = [model, label]
            for ctx in sweep.CONTEXTS:
                row = next((r for r in reversed(mine) if _context_label(r) == label and r["ppl_ctx"] == str(ctx)), None)
                cells.append(_fmt(_ppl(row)))
            lines.append(cells)
    headers = ["model", "configuration"] + [f"ctx {c}" for c in sweep.CONTEXTS]
    return _source(rows, "context") + "\n\n" + markdown_table(headers, lines)


def sections(results_dir: Path) -> dict[str, str]:
    """Block name -> markdown."""
    rows = {suite: suite_rows(results_dir, suite) for suite in sweep.SUITES}
    influence = bench.read_rows(Path(results_dir) / "block_influence.csv")
    scores = sweep.planner_importances(results_dir)
    return {
        "findings-alpha": alpha_section(rows["alpha"]),
        "findings-patterns": patterns_section(rows["patterns"]),
        "findings-importance": importance_section(rows["importance"], influence),
        "findings-planner": planner_section(rows["planner"], scores),
        "findings-distance": distance_section(rows["distance"]),
        "findings-context": context_section(rows["context"]),
    }


# --------------------------------------------------------------------------- plots

def plots(results_dir: Path) -> list[Path]:
    """results/study_*.png, one per suite with rows (the importance and planner figures also
    need their scores); the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results_dir = Path(results_dir)
    rows = {suite: suite_rows(results_dir, suite) for suite in sweep.SUITES}
    figures = (  # drawn and saved one at a time, in this order
        ("study_alpha.png", lambda: _alpha_figure(plt, rows["alpha"])),
        ("study_importance.png", lambda: _importance_figure(plt, importance_scores(
            rows["importance"], bench.read_rows(results_dir / "block_influence.csv")))),
        ("study_planner.png", lambda: _planner_figure(plt, planner_curves(
            rows["planner"], sweep.planner_importances(results_dir)))),
        ("study_context.png", lambda: _context_figure(plt, rows["context"])),
        ("study_patterns.png", lambda: _patterns_figure(plt, rows["patterns"])))
    paths = []
    for name, draw in figures:
        fig = draw()
        if fig is not None:
            paths.append(save_figure(fig, results_dir / name))
    return paths


def _alpha_figure(plt, rows: list[dict]):
    """Perplexity against alpha per model, the unpatched model's dotted; None without rows."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in _models(rows):
        points = sorted((_alpha_key(r), _ppl(r)) for r in rows
                        if r["model"] == model and r["variant"] == "kvcache")
        line, = ax.plot([a for a, _ in points], [p for _, p in points], "o-", label=model)
        ref = reference(points and next(r for r in rows if r["model"] == model), rows)
        if ref:
            ax.axhline(ref, color=line.get_color(), ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("alpha (even layers offloaded; 1 = exact)")
    ax.set_ylabel("perplexity (log), dotted: unpatched")
    ax.set_title("Perplexity vs alpha")
    ax.legend(fontsize=8)
    return fig


def _importance_figure(plt, scores: dict):
    """Per model: perplexity with each layer removed (bars) and its Block Influence (line)."""
    scored = {m: s for m, s in scores.items() if s[0] and s[1]}
    if not scored:
        return None
    fig, axes = plt.subplots(len(scored), 1, figsize=(9, 3.2 * len(scored)), squeeze=False)
    for ax, (model, (removal, bi)) in zip(axes[:, 0], scored.items()):
        layers = sorted(removal)
        ax.bar(layers, [removal[i] for i in layers], color="tab:blue", label="PPL with the layer removed")
        ax.set_yscale("log")
        ax.set_ylabel("PPL, layer removed (log)", color="tab:blue")
        twin = ax.twinx()
        twin.plot(sorted(bi), [bi[i] for i in sorted(bi)], "o-", color="tab:red", label="Block Influence")
        twin.set_ylabel("Block Influence", color="tab:red")
        twin.set_yscale("log")
        ax.set_title(f"{model}: layer importance, two ways")
        ax.set_xlabel("decoder layer")
    return fig


def _planner_figure(plt, curves: dict):
    """Per model: perplexity against the bytes read per token, one line per skip order."""
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (model, orders) in zip(axes[0], curves.items()):
        for order, points in orders.items():
            points = sorted(points)
            ax.plot([mb for mb, _, _ in points], [p for _, p, _ in points], "o-", label=order)
        ax.set_yscale("log")
        ax.set_xlabel("MB of layer files read per token (stream)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{model}: planner, even layers off the device")
        ax.legend(fontsize=8)
    return fig


def _context_figure(plt, rows: list[dict]):
    """Perplexity against the context length, per model and variant."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in _models(rows):
        mine = [r for r in rows if r["model"] == model]
        for label in dict.fromkeys(map(_context_label, mine)):
            points = sorted((int(r["ppl_ctx"]), _ppl(r)) for r in mine if _context_label(r) == label)
            ax.plot([c for c, _ in points], [p for _, p in points], "o-", label=f"{model}: {label}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens per window)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("Perplexity vs context length")
    ax.legend(fontsize=7)
    return fig


def _patterns_figure(plt, rows: list[dict]):
    """Each layer pattern's perplexity over the unpatched model's, bars per model."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    models = _models(rows)
    width = 0.8 / len(models)
    labels = list(dict.fromkeys(f"{_pattern_label(r)}\nalpha {bench.number(r['alpha']):.3g}" for r in rows))
    for k, model in enumerate(models):
        values = []
        for label in labels:
            row = next((r for r in rows if r["model"] == model and
                        f"{_pattern_label(r)}\nalpha {bench.number(r['alpha']):.3g}" == label), None)
            ref = reference(row, rows) if row else None
            values.append(_ppl(row) / ref if row and ref else 0)
        ax.bar([i + (k - (len(models) - 1) / 2) * width for i in range(len(labels))], values, width, label=model)
    ax.axhline(1, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("PPL / unpatched PPL (log)")
    ax.set_title("Layer patterns and parallel blocks (blocks:N = N adjacent layers off, N kept)")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- answers
# Each suite's answer in sentences whose every number is computed here from the rows; a claim
# is stated only when the rows bear it out (each function checks before it says so).
# answers() returns {suite: (one-line headline, [detail sentences])}.

def cost(ratio: float) -> str:
    """A perplexity ratio as a reader reads it: +17% below 2x, 2.3x or 590x above."""
    if ratio < 2:
        return f"{100 * (ratio - 1):+.0f}%"
    return f"{ratio:.2g}x" if ratio < 100 else f"{ratio:,.0f}x"


def _big(ppl: float) -> str:
    return f"{ppl:,.0f}" if ppl >= 1000 else f"{ppl:.4g}"


def _span(ratios: list[float]) -> str:
    lo, hi = min(ratios), max(ratios)
    return cost(lo) if cost(lo) == cost(hi) else f"{cost(lo)} to {cost(hi)}"


def _has_baseline(rows: list[dict], model: str) -> bool:
    return any(r["model"] == model and r["variant"] == "baseline" for r in rows)


def alpha_answers(rows: list[dict]) -> tuple[str, list[str]] | None:
    from reporting.runs import ORIGINAL  # the original's quoted figures
    if not rows:
        return None
    with_base, exact, ratios, removal = [], [], [], []
    for model in _models(rows):
        mine = [r for r in rows if r["model"] == model]
        ref = reference(mine[0], rows)
        if not ref:
            continue
        by_alpha = {_alpha_key(r): _ppl(r) for r in mine if r["variant"] == "kvcache"}
        if _has_baseline(rows, model):
            with_base.append(model)
            if by_alpha.get(1.0) == ref:
                exact.append(model)
        ratios += [(ppl / ref, alpha, model) for alpha, ppl in by_alpha.items() if alpha not in (0.0, 1.0) and ppl]
        if by_alpha.get(0.0):
            removal.append(by_alpha[0.0] / ref)
    details = []
    all_exact = with_base and len(exact) == len(with_base)
    details.append(("**At alpha = 1, offloading is exact:** " if all_exact else "At alpha = 1, ")
                   + f"with the even layers offloaded the perplexity equals the unpatched model's on {len(exact)} "
                   f"of {len(with_base)} models with an unpatched row" + (": the same computation, bit for bit." if all_exact else "."))
    no_base = [m for m in _models(rows) if not _has_baseline(rows, m)]
    if no_base:
        details.append(f"{', '.join(no_base)}: no unpatched row was run; its reference is its own exact alpha = 1 row.")
    if ratios:
        best = min(ratios)
        half = [r for r, a, _ in ratios if a == 0.5]
        if best[0] > 1:
            details.append(f"**Every other alpha costs perplexity.** The cheapest is alpha {best[1]:g} on {best[2]} "
                           f"({cost(best[0])})" + (f"; alpha 0.5 costs {_span(half)}" if half else "") + ".")
        else:
            details.append(f"**alpha {best[1]:g} beats the unpatched model on {best[2]}** ({cost(best[0])}).")
    if removal:
        details.append(f"Removing the even layers outright (alpha 0) multiplies perplexity by {min(removal):,.0f} to "
                       f"{max(removal):,.0f}: no usable model.")
    if ratios and min(ratios)[0] > 1:
        details.append(f"**The original's improvement ({ORIGINAL['ppl'][0]} -> {ORIGINAL['ppl'][1]} on five short "
                       "sentences, with the naive x + (L(x) - x)) does not reproduce:** no alpha beats the unpatched "
                       "model here, so that gain is not an effect of the technique.")
    headline = (f"alpha = 1 is exact (perplexity equal to the unpatched model's on {len(exact)} of {len(with_base)} "
                "models)")
    if ratios and min(ratios)[0] > 1:
        headline += f"; every other alpha costs perplexity ({_span([r for r, _, _ in ratios])})"
    if removal:
        headline += f"; alpha 0 (removal) multiplies it by {min(removal):,.0f} to {max(removal):,.0f}"
    return headline + ".", details


def importance_answers(rows: list[dict], influence: list[dict]) -> tuple[str, list[str]] | None:
    details, rhos, values, worst_layers = [], [], [], []
    for model, (removal, bi) in importance_scores(rows, influence).items():
        common = sorted(set(removal) & set(bi))
        if len(common) < 3:
            continue
        base = reference(next(r for r in rows if r["model"] == model), rows)
        rho = importance.spearman([removal[i] for i in common], [bi[i] for i in common])
        rhos.append(f"{rho:+.2f} ({model})")
        values.append(rho)
        worst = max(common, key=lambda i: removal[i])
        worst_layers.append(f"{worst} ({model})")
        least = sorted(common, key=lambda i: removal[i])[:3]
        # ranks by importance, 1 = the layer whose removal (or whose Block Influence) is largest
        rank_removal = {i: k + 1 for k, i in enumerate(sorted(common, key=lambda i: -removal[i]))}
        rank_bi = {i: k + 1 for k, i in enumerate(sorted(common, key=lambda i: -bi[i]))}
        off = max(common, key=lambda i: abs(rank_removal[i] - rank_bi[i]))
        text = (f"**{model}**: removing layer {worst} costs most (PPL {_big(removal[worst])}"
                + (f", {cost(removal[worst] / base)}" if base else "") + "); the cheapest to remove are layers "
                + ", ".join(map(str, least))
                + (f" ({_span([removal[i] / base for i in least])})" if base else "")
                + f". The layer Block Influence misjudges most is {off}: #{rank_bi[off]} of {len(common)} in importance "
                f"by Block Influence, #{rank_removal[off]} by removal"
                + (f" (PPL without it {_big(removal[off])}, {cost(removal[off] / base)})" if base else "") + ".")
        details.append(text)
    if not details:
        return None
    agree = "agree" if min(values) >= 0.9 else "agree only in part"
    head = (f"Block Influence (one forward pass) and removal perplexity (one pass per layer) {agree}: Spearman rho "
            f"{', '.join(rhos)}; the most important layer by removal: " + ", ".join(worst_layers) + ".")
    return head, [f"**Block Influence and removal perplexity {agree}.** Spearman rho over all layers: "
                  f"{', '.join(rhos)}. Block Influence is what a user can afford on a large model: one forward pass "
                  "over the corpus (`eval_ppl.py --block-influence`) against one full pass per layer."] + details


def planner_answers(rows: list[dict], scores: dict) -> tuple[str, list[str]] | None:
    curves = planner_curves(rows, scores)
    heads, details, best_ratios = [], [], []
    for model, orders in curves.items():
        n = len(offload_skip.select_layers(sweep.STUDY_MODELS[model]["n_layers"], "even"))
        half = round(n / 2)
        at = {order: {k: (mb, ppl) for mb, ppl, k in points} for order, points in orders.items()}
        ref = at.get("removal", {}).get(0, (None, None))[1]
        at_half = {order: by_k[half] for order, by_k in at.items() if half in by_k}
        if not ref or not at_half:
            continue
        best = min(at_half, key=lambda o: at_half[o][1])
        read_half, read_all = at_half[best][0], at.get(best, {}).get(0, (None,))[0]
        naive = [at_half[o][1] / ref for o in importance.NAIVE_ORDERS if o in at_half]
        heads.append(f"{model} {cost(at_half[best][1] / ref)} ({best} order)")
        best_ratios.append(at_half[best][1] / ref)
        text = (f"**{model}**: skipping {half} of {n} offloaded layers (reading {read_half:.0f}"
                + (f" of {read_all:.0f}" if read_all else "") + f" MB per token) costs {cost(at_half[best][1] / ref)} "
                f"in the best order ({best})" + (f", {_span(naive)} in the naive orders" if naive else "") + ".")
        if "removal" in at:
            points = [k for k in at["removal"] if 0 < k < n]
            beats = [k for k in points if all(at["removal"][k][1] <= at[o][k][1] for o in importance.NAIVE_ORDERS
                                              if k in at.get(o, {}))]
            text += f" The removal order is at or below every naive order at {len(beats)} of {len(points)} points."
        if "block-influence" in at:
            far = max((k for k in at["block-influence"] if k < n), default=None)
            naive_far = [at[o][far][1] for o in importance.NAIVE_ORDERS if far in at.get(o, {})]
            if far and naive_far and at["block-influence"][far][1] > max(naive_far):
                text += (f" Block Influence's order is not monotone: with {far} of {n} skipped it gives PPL "
                         f"{_big(at['block-influence'][far][1])}, worse than every naive order.")
        details.append(text)
    if not details:
        return None
    free = min(best_ratios) < 1.1  # a tenth more perplexity or less: call it nearly free
    return (f"Skipping half the offloaded layers costs, in the best order: {', '.join(heads)}."
            + ("" if free else " No free half."),
            [("" if free else "**There is no free half.** ") + "The planner trades read bytes against quality:"] + details)


def patterns_answers(rows: list[dict]) -> tuple[str, list[str]] | None:
    if not rows:
        return None
    exact_rows = [r for r in rows if bench.number(r["alpha"]) == 1.0 and not _adjacent(r["layers_offloaded"])]
    equal = [r for r in exact_rows if _ppl(r) == reference(r, rows)]
    blocks = {}
    for r in rows:
        if _adjacent(r["layers_offloaded"]) and reference(r, rows):
            blocks.setdefault((r["model"], r["layers"]), {})[bench.number(r["alpha"])] = _ppl(r) / reference(r, rows)
    details = []
    if exact_rows:
        details.append(("**Any set of non-adjacent layers is exact at alpha = 1.** " if len(equal) == len(exact_rows)
                        else "") + f"{len(equal)} of {len(exact_rows)} non-adjacent patterns at alpha 1 ("
                       + "; ".join(dict.fromkeys(f"`{_pattern_label(r)}`" for r in exact_rows))
                       + ") give the unpatched perplexity to the last digit; the choice only sets how much leaves the device.")
    at_one = [by_alpha[1.0] for by_alpha in blocks.values() if 1.0 in by_alpha]
    if at_one:
        details.append(f"**Adjacent layers are a different model.** A run of N adjacent offloaded layers is computed "
                       f"in parallel from one input (`blocks:N`): at alpha 1 it costs {_span(at_one)}.")
        every, some, none, best = [], [], [], []
        for n in sweep.BLOCK_SIZES:
            pairs = [(b[1.0], min(v for a, v in b.items() if a != 1.0)) for (m, layers), b in blocks.items()
                     if layers == f"blocks:{n}" and 1.0 in b and len(b) > 1]
            if pairs:
                lower = sum(avg < one for one, avg in pairs)
                (every if lower == len(pairs) else some if lower else none).append(str(n))
                best += [avg for _, avg in pairs]
        if best:
            parts = [f"on every model for N = {', '.join(every)}" if every else "",
                     f"on some models only for N = {', '.join(some)}" if some else "",
                     f"on none for N = {', '.join(none)}" if none else ""]
            details.append("Averaging (alpha = 1/N, \"Transformer Layers as Painters\") lowers the cost "
                           + "; ".join(p for p in parts if p)
                           + (", and does not rescue it" if min(best) > 1.1 else "") + f" (at best {cost(min(best))}).")
    head = (f"Non-adjacent patterns at alpha 1: {len(equal)} of {len(exact_rows)} exact" if exact_rows else "")
    if at_one:
        head += f"; adjacent layers in parallel (`blocks:N`) cost {_span(at_one)} at alpha 1"
    return head + ".", details


def distance_answers(rows: list[dict]) -> tuple[str, list[str]] | None:
    parts = []
    for model in _models(rows):
        mine = [r for r in rows if r["model"] == model and _alpha_key(r) == 1.0]
        ref = next((_ppl(r) for r in mine if r["inject_distance"] == "1"), None)
        later = [(int(r["inject_distance"]), _ppl(r) / ref) for r in mine if ref and r["inject_distance"] not in ("", "1")]
        if later:
            parts.append((model, sorted(later)))
    if not parts:
        return None
    text = "; ".join(f"{model}: " + ", ".join(f"distance {k} {cost(v)}" for k, v in later) for model, later in parts)
    worse = all(v > 1 for _, later in parts for _, v in later)
    head = f"Injecting k resident layers later costs, at alpha 1 with the even layers: {text}."
    details = [("**It costs far too much to be worth it.** " if worse else "") + head]
    if worse:
        details.append("The next resident layer has to see the offloaded layer's output: hiding a slow read has to "
                       "come from prefetch (reading ahead, at distance 1), not from moving the injection.")
    return head, details


def context_answers(rows: list[dict]) -> tuple[str, list[str]] | None:
    details, spans = [], []
    for model in _models(rows):
        mine = [r for r in rows if r["model"] == model]
        base = {int(r["ppl_ctx"]): _ppl(r) for r in mine if r["variant"] == "baseline"}
        for label in dict.fromkeys(_context_label(r) for r in mine if r["variant"] != "baseline"):
            ppl = {int(r["ppl_ctx"]): _ppl(r) for r in mine if _context_label(r) == label}
            ctxs = sorted(c for c in ppl if c in base)
            if len(ctxs) < 2:
                continue
            lo, hi = ctxs[0], ctxs[-1]
            spans.append((lo, hi, f"{model} {label} {ppl[lo] / base[lo]:.2f}x -> {ppl[hi] / base[hi]:.2f}x"))
            for a, b in zip(ctxs, ctxs[1:]):
                if ppl[b] > ppl[a] and base[b] < base[a]:
                    details.append(f"On {model}, {label} loses ground as the context grows: its perplexity rises "
                                   f"from {ppl[a]:.1f} at ctx {a} to {ppl[b]:.1f} at {b}, while the unpatched model's "
                                   f"falls ({base[a]:.2f} to {base[b]:.2f}). Short texts hide that.")
    if not spans:
        return None
    ctx = sorted({(lo, hi) for lo, hi, _ in spans})
    head = (f"The approximate variants' perplexity over the unpatched model's, from ctx "
            f"{' / '.join(str(lo) for lo, _ in ctx)} to {' / '.join(str(hi) for _, hi in ctx)}: "
            + "; ".join(text for _, _, text in spans) + ".")
    return head, ["At alpha = 1 with non-adjacent layers offloading is exact at any length, so only the approximate "
                  "variants can change with context. " + head] + details


def answers(results_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """{suite: (headline, detail sentences)} for the suites that have rows."""
    rows = {suite: suite_rows(results_dir, suite) for suite in sweep.SUITES}
    influence = bench.read_rows(Path(results_dir) / "block_influence.csv")
    found = {
        "alpha": alpha_answers(rows["alpha"]),
        "importance": importance_answers(rows["importance"], influence),
        "planner": planner_answers(rows["planner"], sweep.planner_importances(results_dir)),
        "patterns": patterns_answers(rows["patterns"]),
        "distance": distance_answers(rows["distance"]),
        "context": context_answers(rows["context"]),
    }
    return {suite: found for suite, found in found.items() if found}
