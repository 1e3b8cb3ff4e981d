"""reporting/study.py: the Findings tables come from the suites' rows, against the right reference."""
import bench
import offload_skip
import sweep
from reporting import runs, study
from test_results import _row

MODEL = "smollm2-135m"  # a study model: the planner's layers come from sweep.STUDY_MODELS
N = sweep.STUDY_MODELS[MODEL]["n_layers"]
EVEN = offload_skip.select_layers(N, "even")
COMMON = dict(model=MODEL, n_layers=N, ppl_dataset="wiki-embedded", ppl_ctx=512, ppl_stride=512, ppl_tokens=2044)


def _case(variant="kvcache", layers="even", alpha=1.0, skipped=(), distance=1, command=None, **changes):
    offloaded = offload_skip.select_layers(N, layers) if variant != "baseline" else []
    patched = variant != "baseline"
    values = dict(COMMON, variant=variant, layers=layers if patched else "",
                  layers_offloaded=" ".join(map(str, offloaded)), alpha=alpha if patched else None,
                  skipped_layers=" ".join(map(str, skipped)), inject_distance=distance if patched else None,
                  mode="session" if variant == "kvcache" else "stream" if patched else "resident",
                  command=command or f"python eval_ppl.py {variant} {layers} {alpha} {skipped} {distance}")
    values.update(changes)
    return _row(**values)


def test_alpha_table_against_the_baseline_of_the_same_tokens(tmp_path):
    bench.append_row(tmp_path / "alpha.csv", _case("baseline", ppl=16.0))
    for alpha, ppl in ((0.0, 9000.0), (0.5, 37.0), (1.0, 16.0)):
        bench.append_row(tmp_path / "alpha.csv", _case(alpha=alpha, ppl=ppl))
    bench.append_row(tmp_path / "alpha.csv", _case(alpha=0.5, ppl=38.5))  # a rerun of a case: it wins
    text = study.sections(tmp_path)["findings-alpha"]
    assert f"| {MODEL} | {len(EVEN)} | 16.00 | 9000.00 |  | 38.50 |  | 16.00 |  |  |" in text
    assert "From results/alpha.csv (4 rows" in text
    assert runs.load_rows(tmp_path) == []  # the suites stay out of the main results table


def test_reference_falls_back_to_an_exact_row_only():
    rows = [r.__dict__ for r in (_case(alpha=0.5, ppl=30.0), _case(layers="blocks:2", ppl=20.0),
                                 _case(distance=2, ppl=19.0), _case(skipped=(2,), ppl=18.0))]
    rows = [{k: bench.csvio.cell(v) for k, v in r.items()} for r in rows]
    assert study.reference(rows[0], rows) is None  # none of them is exact
    exact = {k: bench.csvio.cell(v) for k, v in _case(ppl=16.0).__dict__.items()}
    assert study.reference(rows[0], rows + [exact]) == 16.0
    other_tokens = dict(exact, ppl_tokens="1020")
    assert study.reference(rows[0], rows + [other_tokens]) is None


def test_planner_table_follows_the_orders(tmp_path):
    removal = {i: 100.0 + i for i in range(N)}  # lower layers matter less
    for i in range(N):
        bench.append_row(tmp_path / "importance.csv", _case(layers=str(i), alpha=0.0, ppl=removal[i]))
    influence = [bench.environment() for _ in range(N)]
    for i, env in enumerate(influence):
        from bench.importance import InfluenceRow
        bench.append_row(tmp_path / "block_influence.csv", InfluenceRow(
            MODEL, "fp32", "cpu", "CPU: x", N, i, 1.0 / (i + 1), 100, 16.0, "wiki-embedded", 512, "c", "r", **env))
    scores = sweep.planner_importances(tmp_path)
    points = sweep.planner_points(EVEN, scores[MODEL])
    layer_bytes = 1_000_000
    for point in points:
        bench.append_row(tmp_path / "planner.csv", _case(
            "diskoffload", skipped=point.skipped, ppl=16.0 + 10 * len(point.skipped),
            read_bytes_per_token=layer_bytes * (len(EVEN) - len(point.skipped)),
            command="python eval_ppl.py --skip " + ",".join(map(str, point.skipped))))
    curves = study.planner_curves(study.suite_rows(tmp_path, "planner"), scores)
    half = round(len(EVEN) / 2)
    assert set(curves[MODEL]) == {"removal", "block-influence", "first", "last", "alternate"}
    assert (len(EVEN) - half, 16.0 + 10 * half, half) in curves[MODEL]["removal"]
    text = study.sections(tmp_path)["findings-planner"]
    assert f"| {MODEL} | removal | 16.00 | {half} of {len(EVEN)} | {len(EVEN) - half:.1f} | {16 + 10 * half:.2f} |" in text
    importance_text = study.sections(tmp_path)["findings-importance"]
    assert "| -1.00 |" in importance_text  # removal grows with the index, BI falls: opposite ranks


def test_alpha_answers_state_only_what_the_rows_show(tmp_path):
    bench.append_row(tmp_path / "alpha.csv", _case("baseline", ppl=16.0))
    for alpha, ppl in ((0.0, 1600.0), (0.5, 32.0), (0.75, 17.6), (1.0, 16.0)):
        bench.append_row(tmp_path / "alpha.csv", _case(alpha=alpha, ppl=ppl))
    line, details = study.answers(tmp_path)["alpha"]
    assert line.startswith("alpha = 1 is exact (perplexity equal to the unpatched model's on 1 of 1 models)")
    assert "every other alpha costs perplexity (+10% to 2x)" in line and "multiplies it by 100 to 100" in line
    assert any("does not reproduce" in d for d in details)
    # an alpha that beats the unpatched model: no "costs" claim, no "does not reproduce"
    bench.append_row(tmp_path / "alpha.csv", _case(alpha=1.25, ppl=15.0))
    line, details = study.answers(tmp_path)["alpha"]
    assert "every other alpha costs" not in line and not any("does not reproduce" in d for d in details)
    assert any("**alpha 1.25 beats the unpatched model on" in d for d in details)


def test_patterns_answers_count_exact_rows_and_parallel_costs(tmp_path):
    bench.append_row(tmp_path / "patterns.csv", _case("baseline", ppl=16.0))
    bench.append_row(tmp_path / "patterns.csv", _case(layers="odd", ppl=16.0))
    bench.append_row(tmp_path / "patterns.csv", _case(layers="blocks:2", ppl=32.0))
    bench.append_row(tmp_path / "patterns.csv", _case(layers="blocks:2", alpha=0.5, ppl=24.0))
    line, details = study.answers(tmp_path)["patterns"]
    assert line == "Non-adjacent patterns at alpha 1: 1 of 1 exact; adjacent layers in parallel (`blocks:N`) cost 2x at alpha 1."
    assert any("lowers the cost on every model for N = 2, and does not rescue it (at best +50%)" in d for d in details)
    assert study.answers(tmp_path / "none") == {}


def test_plots_draws_a_figure_only_for_the_suites_with_rows(tmp_path):
    assert study.plots(tmp_path) == []
    for alpha, ppl in ((0.5, 38.5), (1.0, 16.0)):
        bench.append_row(tmp_path / "alpha.csv", _case(alpha=alpha, ppl=ppl))
    bench.append_row(tmp_path / "context.csv", _case(ppl_ctx=256, ppl=20.0))
    assert study.plots(tmp_path) == [tmp_path / "study_alpha.png", tmp_path / "study_context.png"]
    assert (tmp_path / "study_alpha.png").read_bytes()[:4] == b"\x89PNG"
