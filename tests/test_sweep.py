"""sweep.py as pure functions: the suites' cases, the planner's inputs, resumption and the
command line. No case is ever run; files are written only under tmp_path."""
import csv
import shlex

import pytest

import bench
import eval_ppl
import offload_skip
import run_baseline
import run_diskoffload
import run_fit
import run_kvcache
import sweep
from bench import importance

ALL_MODELS = {**sweep.STUDY_MODELS, **sweep.HEADLINE_MODELS, **sweep.CHEAP_MODELS}
ORDERS = ("removal", "block-influence", *importance.NAIVE_ORDERS)


def _flags(case: sweep.Case) -> dict:
    """A case's eval_ppl flags as {flag: value}, True for a switch; every flag appears once."""
    assert case.argv[0] == "eval_ppl.py"
    flags, args = {}, list(case.argv[1:])
    while args:
        flag = args.pop(0)
        assert flag.startswith("--") and flag not in flags, case.command
        flags[flag] = args.pop(0) if args and not args[0].startswith("--") else True
    return flags


def _without_common(flags: dict) -> tuple:
    """What tells a suite's cases apart: the flags other than model, quant, tokens and out."""
    return tuple((k, v) for k, v in flags.items()
                 if k not in ("--model", "--quant", "--ppl-max-tokens", "--out"))


def _importances(models=sweep.STUDY_MODELS) -> dict:
    """Made-up scores for the even layers of each model's band, chosen so that no importance
    order equals a naive one: removal puts the first layer last, Block Influence mixes."""
    scores = {}
    for model, spec in models.items():
        even = offload_skip.select_layers(spec["n_layers"], "even")
        removal = {i: 10.0 + k for k, i in enumerate(even)}
        removal[even[0]] = 99.0
        influence = {i: float((k * 3) % len(even)) for k, i in enumerate(even)}
        scores[model] = {"removal": removal, "block-influence": influence}
    return scores


# --------------------------------------------------------------------------- suite_cases

@pytest.mark.parametrize("suite, count", [
    ("alpha", 2 * (1 + len(sweep.ALPHAS)) + len(sweep.HEADLINE_ALPHAS) + 1 + len(sweep.ALPHAS)),
    ("patterns", 2 * (5 + 2 * len(sweep.BLOCK_SIZES))),
    ("importance", (1 + 30) + (1 + 24)),
    ("distance", 2 * 2 * len(sweep.DISTANCES)),
    ("context", 2 * 3 * len(sweep.CONTEXTS)),
])
def test_every_case_is_one_eval_ppl_command(tmp_path, suite, count):
    out = tmp_path / f"{suite}.csv"
    cases = sweep.suite_cases(suite, out)
    assert len(cases) == count
    commands = [case.command for case in cases]
    assert len(set(commands)) == len(commands)
    for case in cases:
        assert case.suite == suite
        assert case.command.startswith("python eval_ppl.py --model ")
        # what eval_ppl records in its `command` column: resumption compares the two
        assert case.command == shlex.join(["python", "eval_ppl.py", *case.argv[1:]])
        assert case.argv[-2:] == ("--out", str(out))
        flags = _flags(case)
        model = flags["--model"]
        assert flags["--quant"] == sweep.QUANT == "fp32"
        tokens = sweep.CONTEXT_TOKENS if suite == "context" else ALL_MODELS[model]["tokens"]
        assert flags["--ppl-max-tokens"] == str(tokens)
        assert flags["--variant"] in ("baseline", "kvcache")
    assert bench.read_rows(out) == [] and not out.exists()


SCRIPTS = {"eval_ppl.py": eval_ppl, "run_baseline.py": run_baseline, "run_kvcache.py": run_kvcache,
           "run_diskoffload.py": run_diskoffload, "run_fit.py": run_fit}


@pytest.mark.parametrize("suite", sweep.SUITES)
def test_every_case_parses_with_its_scripts_command_line(tmp_path, monkeypatch, suite):
    parsed = []
    def main(run, parser, argv, finish=bench.finish_args):  # parse and check, run nothing
        parsed.append(finish(parser.parse_args(argv)))
        return 0
    monkeypatch.setattr(bench, "main", main)
    cases = sweep.suite_cases(suite, tmp_path / f"{suite}.csv", _importances())
    for case in cases:
        assert SCRIPTS[case.argv[0]].main(list(case.argv[1:])) == 0
    assert len(parsed) == len(cases)
    assert {str(args.out) for args in parsed} == {str(tmp_path / f"{suite}.csv")}


def test_beyond_suite(tmp_path):
    out = tmp_path / "beyond.csv"
    cases = sweep.suite_cases("beyond", out)
    assert len(cases) == len(sweep.BEYOND_MODELS) * len(sweep.BEYOND_STEPS) == 20
    first = [c.command for c in cases[:5]]
    common = "--model smollm2-135m --quant nf4 --max-new-tokens 16 --repeats 2 --ppl-max-tokens 1024"
    assert first == [
        f"python run_baseline.py {common} --out {out}",
        f"python run_kvcache.py {common} --out {out}",
        f"python run_kvcache.py {common} --offload-embeddings --out {out}",
        f"python run_kvcache.py {common} --offload-embeddings --quant-head nf4 --out {out}",
        f"python run_diskoffload.py {common} --offload-embeddings --quant-head nf4 --out {out}",
    ]
    assert [c.argv[2] for c in cases[::5]] == list(sweep.BEYOND_MODELS)


def test_load_suite(tmp_path):
    out = tmp_path / "load.csv"
    common = "--model qwen2.5-coder-1.5b --quant nf4 --max-new-tokens 4 --warmup 0 --repeats 1 --ppl-max-tokens 512"
    assert [c.command for c in sweep.suite_cases("load", out)] == [
        f"python {script} {common} --out {out}" for script in ("run_baseline.py", "run_kvcache.py", "run_diskoffload.py")]


def test_cpu_read_suite(tmp_path):
    out = tmp_path / "cpu_read.csv"
    commands = [c.command for c in sweep.suite_cases("cpu_read", out)]
    assert len(commands) == 2 * len(sweep.CPU_READ_CASES)
    tail = "--max-new-tokens 32 --repeats 11 --ppl-max-tokens 0"
    assert commands[:2] == [
        f"python run_diskoffload.py --model smollm2-135m --quant nf4 --batch-size 1 --prefetch 0 --cpu-read {way} "
        f"{tail} --out {out}" for way in ("copy", "map")]  # each pair back to back: one machine state


def test_alpha_suite(tmp_path):
    cases = sweep.suite_cases("alpha", tmp_path / "alpha.csv")
    got = [(_flags(c)["--model"], _without_common(_flags(c))) for c in cases]
    expected = []
    for model in sweep.STUDY_MODELS:
        expected.append((model, (("--variant", "baseline"),)))
        expected += [(model, (("--variant", "kvcache"), ("--alpha", f"{a:g}"))) for a in sweep.ALPHAS]
    for model in sweep.HEADLINE_MODELS:
        expected += [(model, (("--variant", "kvcache"), ("--alpha", f"{a:g}"))) for a in sweep.HEADLINE_ALPHAS]
    for model in sweep.CHEAP_MODELS:
        expected.append((model, (("--variant", "baseline"),)))
        expected += [(model, (("--variant", "kvcache"), ("--alpha", f"{a:g}"))) for a in sweep.ALPHAS]
    assert got == expected
    alphas = [_flags(c).get("--alpha") for c in cases if _flags(c)["--model"] == "smollm2-135m"]
    assert alphas == [None, "0", "0.25", "0.5", "0.75", "1", "1.25", "1.5"]
    assert ("python eval_ppl.py --model qwen2.5-coder-0.5b --quant fp32 --ppl-max-tokens 1024 --variant kvcache "
            f"--alpha 0.25 --out {tmp_path / 'alpha.csv'}") in [c.command for c in cases]


def test_patterns_suite(tmp_path):
    cases = sweep.suite_cases("patterns", tmp_path / "patterns.csv")
    by_model = {}
    for case in cases:
        flags = _flags(case)
        assert flags["--variant"] == "kvcache"
        by_model.setdefault(flags["--model"], []).append(
            " ".join(f"{k} {v}" for k, v in _without_common(flags) if k != "--variant"))
    assert by_model["qwen2.5-coder-0.5b"] == [
        "--layers even", "--layers odd", "--layers every:3",
        "--layers 2,4,6,8,10", "--layers 12,14,16,18,20",
        "--layers blocks:2 --alpha 1", "--layers blocks:2 --alpha 0.5",
        "--layers blocks:3 --alpha 1", "--layers blocks:3 --alpha 0.333333",
        "--layers blocks:4 --alpha 1", "--layers blocks:4 --alpha 0.25",
    ]
    assert by_model["smollm2-135m"][3:5] == ["--layers 2,4,6,8,10,12", "--layers 14,16,18,20,22,24,26"]
    assert by_model["smollm2-135m"][5:] == by_model["qwen2.5-coder-0.5b"][5:]


@pytest.mark.parametrize("n_layers, halves", [
    (8, ("2", "4")),  # band 2..4: even layers 2 and 4
    (24, ("2,4,6,8,10", "12,14,16,18,20")),
    (30, ("2,4,6,8,10,12", "14,16,18,20,22,24,26")),
    (36, ("2,4,6,8,10,12,14,16", "18,20,22,24,26,28,30,32")),
])
def test_half_band(n_layers, halves):
    assert sweep.half_band(n_layers) == halves


def test_importance_suite(tmp_path):
    out = tmp_path / "importance.csv"
    cases = sweep.suite_cases("importance", out)
    for model, spec in sweep.STUDY_MODELS.items():
        mine = [_flags(c) for c in cases if _flags(c)["--model"] == model]
        assert len(mine) == 1 + spec["n_layers"]
        baseline = [f for f in mine if f["--variant"] == "baseline"]
        assert baseline == [mine[0]]
        assert _without_common(baseline[0]) == (("--variant", "baseline"), ("--block-influence", True),
                                                ("--influence-out", str(tmp_path / "block_influence.csv")))
        assert [_without_common(f) for f in mine[1:]] == [
            (("--variant", "kvcache"), ("--layers", str(i)), ("--alpha", "0")) for i in range(spec["n_layers"])]


def test_distance_suite(tmp_path):
    cases = sweep.suite_cases("distance", tmp_path / "distance.csv")
    for model in sweep.STUDY_MODELS:
        got = [_without_common(_flags(c)) for c in cases if _flags(c)["--model"] == model]
        assert got == [(("--variant", "kvcache"), ("--inject-distance", str(k)), ("--alpha", a))
                       for a in ("1", "0.5") for k in (1, 2, 3)]
    assert sweep.DISTANCES == (1, 2, 3)


def test_context_suite(tmp_path):
    cases = sweep.suite_cases("context", tmp_path / "context.csv")
    assert {_flags(c)["--ppl-max-tokens"] for c in cases} == {str(sweep.CONTEXT_TOKENS)}
    assert sweep.CONTEXT_TOKENS >= max(sweep.CONTEXTS)  # one full window at the longest context
    for model in sweep.STUDY_MODELS:
        got = [_without_common(_flags(c)) for c in cases if _flags(c)["--model"] == model]
        expected = []
        for ctx in sweep.CONTEXTS:
            expected += [(("--variant", "baseline"), ("--ppl-ctx", str(ctx))),
                         (("--variant", "kvcache"), ("--alpha", "0.5"), ("--ppl-ctx", str(ctx))),
                         (("--variant", "kvcache"), ("--layers", sweep.CONTEXT_PATTERN), ("--ppl-ctx", str(ctx)))]
        assert got == expected


def test_unknown_suite(tmp_path):
    with pytest.raises(bench.UsageError) as err:
        sweep.suite_cases("alphas", tmp_path / "x.csv")
    assert str(err.value) == ("unknown suite 'alphas'; choose from "
                              "alpha, patterns, importance, planner, distance, context, beyond, load, cpu_read, speculative, "
                              "fit")


# --------------------------------------------------------------------------- the planner

@pytest.mark.parametrize("importances, missing", [
    (None, "smollm2-135m"),
    ({}, "smollm2-135m"),
    ({"smollm2-135m": _importances()["smollm2-135m"]}, "qwen2.5-coder-0.5b"),
])
def test_planner_needs_the_importance_suite(tmp_path, importances, missing):
    with pytest.raises(bench.UsageError) as err:
        sweep.suite_cases("planner", tmp_path / "planner.csv", importances)
    assert str(err.value) == (f"planner: no importance rows for {missing} in {tmp_path}; "
                              "run: python sweep.py importance")


def test_planner_cases(tmp_path):
    out = tmp_path / "planner.csv"
    scores = _importances()
    cases = sweep.suite_cases("planner", out, scores)
    commands = [c.command for c in cases]
    assert len(set(commands)) == len(commands)
    expected_total = 0
    for model, spec in sweep.STUDY_MODELS.items():
        offloaded = offload_skip.select_layers(spec["n_layers"], "even")
        counts = importance.skip_counts(len(offloaded), sweep.PLANNER_POINTS)
        mine = [_flags(c) for c in cases if _flags(c)["--model"] == model]
        for flags in mine:
            assert (flags["--variant"], flags["--prefetch"], flags["--ppl-max-tokens"]) == (
                "diskoffload", "0", str(spec["tokens"]))
            assert "--layers" not in flags and "--alpha" not in flags  # the default: even, alpha 1
        skips = [flags.get("--skip") for flags in mine]
        # stream everything and skip everything: once each, though every order has them
        assert skips.count(None) == 1 and skips[0] is None
        assert skips.count(",".join(map(str, offloaded))) == 1
        wanted = []
        for name in ORDERS:
            order = importance.skip_order(offloaded, "importance" if name in scores[model] else name,
                                          scores[model].get(name))
            for k in counts:
                skip = ",".join(map(str, sorted(order[:k]))) or None
                if skip not in wanted:
                    wanted.append(skip)
        assert skips == wanted
        # five orders, three inner points each, no two alike (the made-up scores see to that)
        assert len(mine) == 2 + 5 * (len(counts) - 2)
        expected_total += len(mine)
    assert len(cases) == expected_total == 2 * 17


def test_planner_points_by_hand():
    """The qwen2.5-coder-0.5b curves (even layers 2..20) for one set of scores, written out."""
    offloaded = [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    removal = {2: 50.0, 4: 12.0, 6: 11.0, 8: 13.0, 10: 14.0, 12: 10.0, 14: 15.0, 16: 16.0, 18: 17.0, 20: 18.0}
    influence = {i: 0.1 for i in offloaded} | {20: 0.05, 2: 0.3}
    points = sweep.planner_points(offloaded, {"removal": removal, "block-influence": influence})
    assert importance.skip_counts(10, sweep.PLANNER_POINTS) == [0, 2, 5, 8, 10]
    inner = {(p.order, len(p.skipped)): p.skipped for p in points if 0 < len(p.skipped) < 10}
    assert inner == {
        ("removal", 2): (6, 12), ("removal", 5): (4, 6, 8, 10, 12), ("removal", 8): (4, 6, 8, 10, 12, 14, 16, 18),
        ("block-influence", 2): (4, 20), ("block-influence", 5): (4, 6, 8, 10, 20),
        ("block-influence", 8): (4, 6, 8, 10, 12, 14, 16, 20),
        ("first", 2): (2, 4), ("first", 5): (2, 4, 6, 8, 10), ("first", 8): (2, 4, 6, 8, 10, 12, 14, 16),
        ("last", 2): (18, 20), ("last", 5): (12, 14, 16, 18, 20), ("last", 8): (6, 8, 10, 12, 14, 16, 18, 20),
        ("alternate", 2): (2, 6), ("alternate", 5): (2, 6, 10, 14, 18),
        ("alternate", 8): (2, 4, 6, 8, 10, 12, 14, 18),
    }
    assert [p.order for p in points] == [o for o in ORDERS for _ in range(5)]
    assert [p.read_fraction for p in points[:5]] == [1.0, 0.8, 0.5, 0.2, 0.0]


# --------------------------------------------------------------------------- planner_importances

def _write_csv(path, fields, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


IMPORTANCE_FIELDS = ["variant", "alpha", "layers_offloaded", "ppl", "model"]
INFLUENCE_FIELDS = ["model", "layer", "block_influence"]


def _removal(model, layer, ppl, alpha="0", variant="kvcache"):
    return dict(variant=variant, alpha=alpha, layers_offloaded=str(layer), ppl=ppl, model=model)


def test_planner_importances(tmp_path):
    _write_csv(tmp_path / "importance.csv", IMPORTANCE_FIELDS, [
        dict(variant="baseline", alpha="", layers_offloaded="", ppl="9.5", model="m1"),  # the BI pass
        _removal("m1", 0, "120.5"),
        _removal("m1", 1, "15.25"),
        _removal("m1", 2, "11"),
        _removal("m1", 2, "10.75"),               # a rerun: the latest row wins
        _removal("m1", 3, "13", alpha="0.5"),     # not a removal
        _removal("m1", 3, ""),                    # no perplexity
        dict(variant="kvcache", alpha="0", layers_offloaded="3 5", ppl="30", model="m1"),  # two layers
        _removal("m1", 4, "12", variant="baseline"),
        _removal("only-removal", 2, "11"),
    ])
    _write_csv(tmp_path / "block_influence.csv", INFLUENCE_FIELDS, [
        dict(model="m1", layer="0", block_influence="0.5"),
        dict(model="m1", layer="1", block_influence="0.125"),
        dict(model="m1", layer="1", block_influence="0.25"),  # the latest row wins
        dict(model="m1", layer="2", block_influence="0.0625"),
        dict(model="only-influence", layer="2", block_influence="0.1"),
    ])
    assert sweep.planner_importances(tmp_path) == {
        "m1": {"removal": {0: 120.5, 1: 15.25, 2: 10.75}, "block-influence": {0: 0.5, 1: 0.25, 2: 0.0625}},
    }


@pytest.mark.parametrize("files, expected", [
    ((), {}),
    (("importance.csv",), {}),
    (("block_influence.csv",), {}),
    (("importance.csv", "block_influence.csv"), {"m": {"removal": {2: 11.0}, "block-influence": {2: 0.1}}}),
])
def test_planner_importances_needs_both_files(tmp_path, files, expected):
    if "importance.csv" in files:
        _write_csv(tmp_path / "importance.csv", IMPORTANCE_FIELDS, [_removal("m", 2, "11")])
    if "block_influence.csv" in files:
        _write_csv(tmp_path / "block_influence.csv", INFLUENCE_FIELDS,
                   [dict(model="m", layer="2", block_influence="0.1")])
    assert sweep.planner_importances(tmp_path) == expected


# --------------------------------------------------------------------------- pending

def test_pending_drops_the_finished_cases(tmp_path):
    out = tmp_path / "alpha.csv"
    cases = sweep.suite_cases("alpha", out)
    done = [cases[0].command, cases[5].command, cases[-1].command]
    _write_csv(out, ["model", "command", "ppl"],
               [dict(model="x", command=c, ppl="1") for c in done]
               + [dict(model="x", command="python eval_ppl.py --something-else", ppl="2"),
                  dict(model="x", command=cases[1].command + " --extra", ppl="3")])  # exact match only
    assert sweep.pending(cases) == [c for c in cases if c.command not in done]
    assert len(sweep.pending(cases)) == len(cases) - 3


@pytest.mark.parametrize("name", ["missing.csv", "no-such-dir/alpha.csv"])
def test_pending_without_a_file_is_everything(tmp_path, name):
    cases = sweep.suite_cases("distance", tmp_path / name)
    assert sweep.pending(cases) == cases
    assert not (tmp_path / name).exists()


# --------------------------------------------------------------------------- the command line

def test_dry_run_prints_one_command_per_case(tmp_path, capsys):
    assert sweep.main(["alpha", "--dry-run", "--results", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [c.command for c in sweep.suite_cases("alpha", tmp_path / "alpha.csv")]
    assert len(printed) == 27
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_dry_run_prints_the_pending_cases_and_all_with_all(tmp_path, capsys):
    cases = sweep.suite_cases("distance", tmp_path / "distance.csv")
    _write_csv(tmp_path / "distance.csv", ["command"], [dict(command=cases[2].command)])
    assert sweep.main(["distance", "--dry-run", "--results", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [c.command for c in cases if c is not cases[2]]
    assert sweep.main(["distance", "--dry-run", "--all", "--results", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [c.command for c in cases]
    _write_csv(tmp_path / "distance.csv", ["command"], [dict(command=c.command) for c in cases])
    assert sweep.main(["distance", "--dry-run", "--results", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"nothing pending ({len(cases)} cases done; --all lists them)\n"


def test_dry_run_of_the_planner(tmp_path, capsys):
    scores = _importances()
    rows, influence = [], []
    for model, s in scores.items():
        rows += [_removal(model, i, str(v)) for i, v in s["removal"].items()]
        influence += [dict(model=model, layer=str(i), block_influence=str(v)) for i, v in s["block-influence"].items()]
    _write_csv(tmp_path / "importance.csv", IMPORTANCE_FIELDS, rows)
    _write_csv(tmp_path / "block_influence.csv", INFLUENCE_FIELDS, influence)
    assert sweep.main(["planner", "--dry-run", "--results", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [c.command for c in sweep.suite_cases("planner", tmp_path / "planner.csv", scores)]
    assert len(printed) == 34


@pytest.mark.parametrize("argv, message", [
    (["planner", "--dry-run"], "planner: no importance rows for smollm2-135m in {results}; "
                               "run: python sweep.py importance"),
    (["planner"], "planner: no importance rows for smollm2-135m"),
    ([], "name a suite (or --cases FILE, or --list)"),
    (["--dry-run"], "name a suite (or --cases FILE, or --list)"),
    (["alphas"], "argument suite: invalid choice: 'alphas'"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        sweep.main([*argv, "--results", str(tmp_path)])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n")
    assert lines[0].startswith("sweep.py: error: " + message.format(results=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_list(tmp_path, capsys):
    cases = sweep.suite_cases("distance", tmp_path / "distance.csv")
    _write_csv(tmp_path / "distance.csv", ["command"], [dict(command=c.command) for c in cases[:5]])
    assert sweep.main(["--list", "--results", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "alpha        27 cases,  27 pending",
        "patterns     22 cases,  22 pending",
        "importance   56 cases,  56 pending",
        f"planner     planner: no importance rows for smollm2-135m in {tmp_path}; run: python sweep.py importance",
        "distance     12 cases,   7 pending",
        "context      30 cases,  30 pending",
        "beyond       20 cases,  20 pending",
        "load          3 cases,   3 pending",
        "cpu_read     12 cases,  12 pending",
        "speculative  34 cases,  34 pending",
        "fit          34 cases,  34 pending",
    ]


def test_planner_with_an_unfinished_importance_suite(tmp_path, capsys):
    rows = [_removal(model, 2, "11") for model in sweep.STUDY_MODELS]
    influence = [dict(model=model, layer="2", block_influence="0.1") for model in sweep.STUDY_MODELS]
    _write_csv(tmp_path / "importance.csv", IMPORTANCE_FIELDS, rows)
    _write_csv(tmp_path / "block_influence.csv", INFLUENCE_FIELDS, influence)
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["planner", "--dry-run", "--results", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("sweep.py: error: planner: ")


def test_results_outside_the_repo_given_relative(tmp_path, monkeypatch):
    """`--results out` given from tmp_path: the cases, run from the repo, write to tmp_path/out,
    where pending() reads."""
    monkeypatch.chdir(tmp_path)
    given = tmp_path.joinpath("out").relative_to(tmp_path)
    assert (bench.REPO_DIR / sweep._relative(given)).resolve() == (tmp_path / "out").resolve()


def test_speculative_suite(tmp_path):
    out = tmp_path / "speculative.csv"
    commands = [c.command for c in sweep.suite_cases("speculative", out)]
    common = "--prompt-count 3 --max-new-tokens 32 --repeats 1 --ppl-max-tokens 0"
    assert commands[0] == (f"python run_diskoffload.py --model qwen2.5-coder-1.5b --quant bf16 --draft qwen2.5-coder-0.5b "
                           f"--draft-schedule adaptive --prompts code {common} --prefetch 0 --out {out}")
    adaptive = [c for c in commands if "--draft-schedule adaptive" in c]
    constant = [c for c in commands if "--draft-schedule constant" in c]
    assert len(adaptive) + len(constant) == len(commands) == len(set(commands))
    # the default schedule from the page cache, every draft on both prompt kinds, the low widths on code
    pairs = 2 * sum(len(d) for d in sweep.SPECULATIVE_DRAFTS.values())
    low_bits = sum(len(d) for d in sweep.SPECULATIVE_LOW_BITS.values())
    assert len(adaptive) == pairs + low_bits and not any("--cold" in c for c in adaptive)
    # every draft asked at every verify: the same, plus fp32; code prompts cold, and cold with read-ahead
    page_cache = [c for c in constant if "--cold" not in c]
    assert len(page_cache) == pairs + low_bits + len(sweep.SPECULATIVE_FP32)
    assert sum("self:hqq" in c for c in constant) == 3
    cold = [c for c in constant if "--cold --cpu-read copy --prefetch 0" in c]
    assert len(cold) == sum(len(d) for d in sweep.SPECULATIVE_COLD.values())
    assert all("--prompts code" in c for c in commands if "--cold" in c)
