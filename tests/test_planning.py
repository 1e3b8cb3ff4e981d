"""--device-budget end to end on a tiny checkpoint: the plan printed and recorded, the budget
held as the row counts it, the probe cached per machine and model, one-line errors; and
run_fit.py's rows (the plan against its grid). No timing assertions."""
import contextlib
import io
import json

import pytest
from tiny_checkpoint import save_tiny_checkpoint

import bench
import offload_skip
import run_diskoffload
import run_fit
import run_kvcache

N_LAYERS = 8
_real_cpu_sample = bench.measure._cpu_sample


def _quiet_machine():
    """bench.measure._cpu_sample on a machine where only this process runs."""
    wall, _, own = _real_cpu_sample()
    return wall, own, own


def _busy_machine():
    """As if other processes used every core all along."""
    wall, _, own = _real_cpu_sample()
    return wall, own + wall * 64, own


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """The machine's own load must not decide whether a probe is kept: a quiet one here."""
    monkeypatch.setattr(bench.measure, "_cpu_sample", _quiet_machine)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("planning")
    checkpoint = save_tiny_checkpoint(root / "tiny", n_layers=N_LAYERS)
    model, _, _ = bench.load_model(str(checkpoint), "fp32", "cpu", root / "cache")
    shape = offload_skip.ModelBytes.of(model, "cpu")
    total = sum(shape.layer_bytes) + shape.embedding_bytes + shape.head_bytes + shape.other_bytes
    return root, checkpoint, total


def _argv(setup, out, *extra):
    root, checkpoint, _ = setup
    return ["--model", str(checkpoint), "--quant", "fp32", "--device", "cpu", "--cache-dir", str(root / "cache"),
            "--prompt", "Once upon a time", "--max-new-tokens", "5", "--warmup", "1", "--repeats", "2",
            "--ppl-max-tokens", "0", "--out", str(out), *extra]


def _run(module, argv) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert module.main(argv) == 0
    return stdout.getvalue()


def test_a_device_budget_plans_prints_and_holds(setup, tmp_path):
    budget = int(0.6 * setup[2])
    out = tmp_path / "d.csv"
    printed = _run(run_diskoffload, _argv(setup, out, "--device-budget", str(budget)))
    assert f"plan for {budget / 2**30:.2f} GiB ({budget:,} bytes):" in printed
    (row,) = bench.read_rows(out)
    assert row["layers"] == "plan" and row["layers_offloaded"] == " ".join(map(str, range(N_LAYERS)))
    assert int(row["device_budget_bytes"]) == budget
    assert row["plan"].startswith("streamed=") and "cpu_read=copy" in row["plan"]
    assert int(row["peak_bytes"]) == int(row["predicted_peak_bytes"])  # counted as the plan counts them
    assert int(row["peak_bytes"]) < budget
    assert float(row["predicted_decode_tok_s"]) > 0


def test_the_probe_is_cached_per_machine_and_model(setup, tmp_path):
    root = setup[0]
    out = tmp_path / "d.csv"
    budget = str(int(0.7 * setup[2]))
    _run(run_diskoffload, _argv(setup, out, "--device-budget", budget))
    probes = sorted((root / "cache" / "probes").glob("*.json"))
    assert probes
    saved = {p: p.read_bytes() for p in probes}
    _run(run_diskoffload, _argv(setup, out, "--device-budget", budget))
    assert {p: p.read_bytes() for p in sorted((root / "cache" / "probes").glob("*.json"))} == saved
    (first, second) = bench.read_rows(out)
    assert first["predicted_decode_tok_s"] == second["predicted_decode_tok_s"]  # the same rates, read back
    key = json.loads(probes[-1].read_text())["key"]
    assert {"device", "cpu_isa", "torch", "layers", "batch", "prompt_tokens", "cold"} <= set(key)


def test_a_corrupt_probe_names_its_file(setup, tmp_path, capsys):
    root = setup[0]
    out = tmp_path / "d.csv"
    budget = str(int(0.7 * setup[2]))
    _run(run_diskoffload, _argv(setup, out, "--device-budget", budget))
    for path in (root / "cache" / "probes").glob("*.json"):
        path.write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        run_diskoffload.main(_argv(setup, out, "--device-budget", budget))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the loading's progress bars
    assert "Traceback" not in err and last.startswith("run_diskoffload.py: error: ")
    assert "bad probe file" in last and "probes/" in last and "delete it" in last
    for path in (root / "cache" / "probes").glob("*.json"):
        path.unlink()


@pytest.mark.parametrize("module, extra, message", [
    (run_kvcache, ("--device-budget", "1M"), "--device-budget plans stream residency, and the kvcache variant holds"),
    (run_diskoffload, ("--device-budget", "1M", "--layers", "odd"), "leave out --layers"),
    (run_diskoffload, ("--device-budget", "1M", "--prefetch", "1"), "leave out --prefetch"),
    (run_diskoffload, ("--device-budget", "1M", "--alpha", "0.5"), "leave out --alpha"),
    (run_diskoffload, ("--device-budget", "0"), "--device-budget must be more than 0 bytes"),
    (run_diskoffload, ("--device-budget", "6 apples"), "invalid size"),
    (run_diskoffload, ("--device-budget", "1K"), "--device-budget 1,000: nothing fits 1,000 bytes"),
    (run_diskoffload, ("--device-budget", "1M", "--draft", "lookup"), "--device-budget weighs a draft in run_fit.py"),
    (run_fit, ("--budget-share", "0.6", "--draft", "self"), "weighs lookup or a draft model, not self:nf4"),
])
def test_bad_device_budgets_are_one_line_errors(setup, tmp_path, capsys, module, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        module.main(_argv(setup, tmp_path / "x.csv", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any loading's progress bars
    assert "Traceback" not in err and message in last and last.startswith(f"{module.__name__}.py: error: "), err


@pytest.mark.parametrize("text, nbytes", [("6GiB", 6 * 2**30), ("6GB", 6 * 10**9), ("6442450944", 6 * 2**30)])
def test_accelerate_spellings(text, nbytes):
    args = bench.build_parser("diskoffload").parse_args(["--device-budget", text])
    assert args.device_budget == nbytes


def test_run_fit_times_the_plan_against_its_grid(setup, tmp_path):
    out = tmp_path / "fit.csv"
    printed = _run(run_fit, _argv(setup, out, "--budget-share", "0.6", "--rounds", "1"))
    assert "plan for" in printed
    rows = bench.read_rows(out)
    configs = [r["config"] for r in rows]
    assert configs[0] == "plan" and "default" in configs and "default-copy" in configs
    assert {c for c in configs if c.startswith("grid:")} == {
        f"grid:{p}:{r}:{d}" for p in offload_skip.PLACEMENTS for r, ds in (("copy", (0, 1, 2)), ("map", (0,)))
        for d in ds}
    assert len({r["case_id"] for r in rows}) == 1 and len({r["device_budget_bytes"] for r in rows}) == 1
    budget = int(rows[0]["device_budget_bytes"])
    assert budget == int(0.6 * setup[2])
    for r in rows:  # fits is what the row's own bytes say
        assert (r["fits"] == "True") == (int(r["peak_bytes"]) + int(r["kv_reserve_bytes"]) <= budget)
    plan = rows[0]
    assert plan["fits"] == "True" and int(plan["peak_bytes"]) == int(plan["predicted_peak_bytes"])
    assert plan["plan_over_fastest"] != "" and all(r["plan_over_fastest"] == "" for r in rows[1:])
    assert sum(r["fastest_fitting"] == "True" for r in rows) == 1
    # a mapped layer stays until standby: every grid:...:map row holds all the streamed layers
    assert all(r["fits"] == "False" for r in rows if ":map:" in r["config"])


def test_run_fit_weighs_a_draft_and_times_it_beside_the_grid(setup, tmp_path):
    out = tmp_path / "fit.csv"
    argv = _argv(setup, out, "--budget-share", "0.6", "--rounds", "1", "--draft", "lookup")
    argv[argv.index("Once upon a time")] = "one two three one two three one two three one two"  # lookup finds repeats
    printed = _run(run_fit, argv)
    assert "draft lookup:" in printed and "tokens per verify" in printed
    rows = {r["config"]: r for r in bench.read_rows(out)}
    drafted = {f"grid:{p}:copy:{rows['plan']['prefetch'] if rows['plan']['streamed_layers'] else 1}+draft"
               for p in offload_skip.PLACEMENTS} | {"default+draft"}
    assert drafted <= set(rows) and "plan-alternative" in rows
    for name, r in rows.items():
        speculative = name in drafted or r["draft"] == "lookup"
        assert (r["draft"] == "lookup") == speculative and (r["tokens_per_verify"] != "") == speculative
        assert int(r["draft_bytes"]) == 0  # lookup holds nothing
    # the alternative is of the other kind than the plan's choice
    assert (rows["plan"]["draft"] == "") != (rows["plan-alternative"]["draft"] == "")
    assert "draft lookup" in rows["plan"]["rates"]


def test_a_probe_beside_other_work_is_used_once_not_kept(setup, tmp_path, monkeypatch, capsys):
    root = setup[0]
    for path in (root / "cache" / "probes").glob("*.json"):
        path.unlink()
    monkeypatch.setattr(bench.measure, "_cpu_sample", _busy_machine)
    out = tmp_path / "d.csv"
    _run(run_diskoffload, _argv(setup, out, "--device-budget", str(int(0.65 * setup[2]))))
    assert not list((root / "cache" / "probes").glob("*.json"))
    assert "while probing; the rates are used for this run only, not cached" in capsys.readouterr().err
