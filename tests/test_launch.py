"""Sweep cases run anywhere without losing or doubling a row: one row file per case, merged in
case order, idempotently; slices for job arrays; submitit's local executor and a SLURM array
(through a stand-in sbatch). The real processes run eval_ppl.py on a tiny checkpoint."""
import csv
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import bench
import eval_ppl
import sweep
from bench import launch
from tiny_checkpoint import save_tiny_checkpoint

Case = launch.Case
# what a rerun of one case gives again: the measured perplexity and what was offloaded
STABLE = ("variant", "model", "alpha", "layers_offloaded", "ppl", "ppl_tokens", "standby_bytes")


def _case(out, alpha="1", **extra) -> Case:
    return Case("s", ("eval_ppl.py", "--variant", "kvcache", "--alpha", alpha,
                      *[x for k, v in extra.items() for x in (f"--{k}", v)], "--out", str(out)))


def _row_file(path, rows, fields=("command", "ppl")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- cases and row files

def test_a_case_names_its_row_file_by_the_hash_of_its_command(tmp_path):
    out = tmp_path / "alpha.csv"
    case = _case(out, "0.5")
    assert case.command == shlex.join(["python", *case.argv])
    assert case.id == hashlib.sha256(case.command.encode()).hexdigest()[:16]
    assert case.out == out
    assert case.row_file == tmp_path / "alpha.d" / f"{case.id}.csv"
    assert case.run_argv == (*case.argv, "--row-file", str(case.row_file))
    assert _case(out, "0.25").id != case.id


def test_a_case_without_out_is_refused():
    with pytest.raises(bench.UsageError, match="this case names no --out: python eval_ppl.py --alpha 1"):
        Case("s", ("eval_ppl.py", "--alpha", "1")).out


@pytest.mark.parametrize("argv, recorded", [
    (["--alpha", "1", "--row-file", "r/x.csv", "--out", "o.csv"], ["--alpha", "1", "--out", "o.csv"]),
    (["--row-file=r/x.csv", "--out", "o.csv"], ["--out", "o.csv"]),
    (["--out", "o.csv"], ["--out", "o.csv"]),
])
def test_the_recorded_command_leaves_out_the_row_file(argv, recorded):
    assert bench.cli.recorded_argv(argv) == recorded


def test_merge_folds_row_files_in_the_given_order_and_removes_them(tmp_path):
    out = tmp_path / "s.csv"
    b = _row_file(tmp_path / "s.d" / "b.csv", [["python b", "2"]])
    a = _row_file(tmp_path / "s.d" / "a.csv", [["python a", "1"], ["python a2", "1.5"]])
    assert bench.merge_row_files(out, [b, a]) == 3
    assert bench.read_rows(out) == [dict(command="python b", ppl="2"), dict(command="python a", ppl="1"),
                                    dict(command="python a2", ppl="1.5")]
    assert not (tmp_path / "s.d").exists()  # emptied, then removed


def test_merging_twice_leaves_the_same_bytes(tmp_path):
    out = _row_file(tmp_path / "s.csv", [["python old", "9"]])
    rows = [["python a", "1"], ["python b", "2"]]
    assert bench.merge_row_files(out, [_row_file(tmp_path / "s.d" / "a.csv", rows)]) == 2
    merged = out.read_bytes()
    assert bench.merge_row_files(out, []) == 0
    # the same row file again (a merge stopped before it removed the files): nothing added
    assert bench.merge_row_files(out, [_row_file(tmp_path / "s.d" / "a.csv", rows)]) == 0
    assert out.read_bytes() == merged
    assert merged.decode().splitlines()[0] == "command,ppl" and merged.count(b"python old") == 1


@pytest.mark.parametrize("fields, rows, message", [
    (("command", "loss"), [["python a", "1"]], r"a\.csv has other columns than .*s\.csv; nothing merged"),
    (("command", "ppl"), [["python a", "1", "extra"]], r"a\.csv: line 2 has 3 cells, the header 2; nothing merged"),
])
def test_merge_refuses_another_schema_and_changes_nothing(tmp_path, fields, rows, message):
    out = _row_file(tmp_path / "s.csv", [["python old", "9"]])
    before = out.read_bytes()
    good = _row_file(tmp_path / "s.d" / "0.csv", [["python z", "3"]])
    bad = _row_file(tmp_path / "s.d" / "a.csv", rows, fields)
    with pytest.raises(bench.UsageError, match=message):
        bench.merge_row_files(out, [good, bad])
    assert out.read_bytes() == before and good.exists() and bad.exists()


def test_pending_reads_the_csv_and_the_row_files_waiting(tmp_path):
    out = tmp_path / "s.csv"
    cases = [_case(out, a) for a in ("0", "0.5", "1", "1.5")]
    _row_file(out, [[cases[0].command, "1"]])
    _row_file(cases[2].row_file, [[cases[2].command, "1"]])
    assert launch.pending(cases) == [cases[1], cases[3]]


@pytest.mark.parametrize("count", [1, 2, 3, 8, 9])
def test_the_slices_of_an_array_split_the_cases_once_each(tmp_path, count):
    cases = [_case(tmp_path / "s.csv", str(a)) for a in range(8)]
    slices = [launch.array_slice(cases, i, count) for i in range(count)]
    ids = [c.id for s in slices for c in s]
    assert sorted(ids) == sorted(c.id for c in cases)  # each case in one slice, once
    assert slices[0][0] == cases[0] and all(len(s) in (len(cases) // count, -(-len(cases) // count)) for s in slices)


def test_array_and_launcher_flags_are_checked(tmp_path, capsys):
    cases = tmp_path / "c.txt"
    cases.write_text(_case(tmp_path / "s.csv").command + "\n")
    for argv, message in [
        (["--array-index", "0"], "--array-index and --array-count go together"),
        (["--array-index", "3", "--array-count", "3"], "--array-index 3 is outside 0..2 (--array-count 3)"),
        (["--array-index", "0", "--array-count", "2", "--launcher", "local"], "choose one"),
        (["--all"], "--all goes with --dry-run"),
        (["--partition", "gpu"], "--partition is a SLURM setting: it goes with --launcher submitit"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            sweep.main(["--cases", str(cases), *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("sweep.py: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ("eval_ppl.py --out x.csv\n", "c.txt:1: a case is a line 'python <script> <arguments>'"),
    ("# a comment\n\npython eval_ppl.py --alpha 1\n", "this case names no --out"),
    ("python eval_ppl.py --out 'x.csv\n", "c.txt:1: No closing quotation"),
])
def test_a_bad_cases_file_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "c.txt").write_text(text)
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--cases", str(tmp_path / "c.txt"), "--dry-run"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_without_submitit_a_launcher_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    cases = tmp_path / "c.txt"
    cases.write_text(_case(tmp_path / "s.csv").command + "\n")
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    for launcher in ("local", "submitit"):
        with pytest.raises(SystemExit) as exit_:
            sweep.main(["--cases", str(cases), "--launcher", launcher])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            "sweep.py: error: --launcher needs submitit, an optional dependency: pip install submitit")


def test_slurm_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    cases = tmp_path / "c.txt"
    cases.write_text(_case(tmp_path / "s.csv").command + "\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--cases", str(cases), "--launcher", "submitit"])
    assert exit_.value.code == 2
    assert "sbatch and srun not on the PATH: --launcher submitit submits to SLURM" in capsys.readouterr().err


def test_slurm_gets_one_array_with_the_flags(tmp_path, capsys, monkeypatch):
    """A stand-in sbatch keeps the submission script and answers as SLURM does."""
    pytest.importorskip("submitit")
    out = tmp_path / "s.csv"
    cases = [_case(out, str(a)) for a in range(5)]
    _row_file(out, [[cases[1].command, "1"]])  # done: not submitted
    (tmp_path / "c.txt").write_text("".join(c.command + "\n" for c in cases))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_ / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; nothing runs here
    for tool in ("sbatch", "srun"):
        (bin_ / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    assert sweep.main(["--cases", str(tmp_path / "c.txt"), "--launcher", "submitit", "--partition", "gpu",
                       "--time", "30", "--gpus-per-task", "1", "--array-parallelism", "3",
                       "--log-folder", str(tmp_path / "logs" / "%j")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("submitted 4 case(s) as SLURM job array 4242, logs in ")
    assert printed[-1].endswith(f"when it has finished: python sweep.py --cases {tmp_path / 'c.txt'} --merge")
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=30",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --job-name=sweep-c", "#SBATCH --ntasks-per-node=1"):
        assert line in script.splitlines(), line
    assert not out.with_name("s.d").exists()  # nothing ran here


# --------------------------------------------------------------------------- real processes

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    model = save_tiny_checkpoint(root / "tiny", n_layers=8)
    corpus = root / "corpus.txt"
    corpus.write_text("The layers that stay resident compute; the others come back from disk. " * 8)
    return root, model, corpus


def _tiny_cases(root, model, corpus, out, alphas) -> list[Case]:
    return [Case(out.stem, ("eval_ppl.py", "--model", str(model), "--quant", "fp32", "--variant", "kvcache",
                            "--layers", "2,4,6", "--alpha", a, "--ppl-dataset", str(corpus), "--ppl-max-tokens",
                            "96", "--ppl-ctx", "32", "--cache-dir", str(root / "cache"), "--out", str(out)))
            for a in alphas]


def _write_cases(path, cases):
    path.write_text("".join(case.command + "\n" for case in cases))
    return path


def _sweep(*argv, **kw):
    return subprocess.run([sys.executable, "sweep.py", *argv], cwd=bench.REPO_DIR, capture_output=True, text=True,
                          **kw)


def _stable(rows):
    return [{k: row[k] for k in STABLE} for row in rows]


def test_three_local_workers_give_each_row_once_as_a_serial_run(tiny, tmp_path):
    pytest.importorskip("submitit")
    root, model, corpus = tiny
    alphas = ("0", "0.25", "0.5", "0.75", "1", "1.25", "1.5", "2")
    serial, parallel = tmp_path / "serial" / "eight.csv", tmp_path / "parallel" / "eight.csv"
    for case in _tiny_cases(root, model, corpus, serial, alphas):  # the serial run, in this process
        assert eval_ppl.main(list(case.run_argv[1:])) == 0
    launch.merge(_tiny_cases(root, model, corpus, serial, alphas))
    cases = _tiny_cases(root, model, corpus, parallel, alphas)
    done = _sweep("--cases", str(_write_cases(tmp_path / "eight.txt", cases)), "--launcher", "local",
                  "--array-parallelism", "3", "--log-folder", str(tmp_path / "logs" / "%j"))
    assert done.returncode == 0, done.stderr
    assert "3 local workers" in done.stdout
    rows = bench.read_rows(parallel)
    assert [row["command"] for row in rows] == [case.command for case in cases]  # once each, in case order
    assert _stable(rows) == _stable(bench.read_rows(serial))
    assert not parallel.with_name("eight.d").exists()
    assert _sweep("--cases", str(tmp_path / "eight.txt"), "--dry-run").stdout == \
        "nothing pending (8 cases done; --all lists them)\n"


def test_a_killed_worker_leaves_no_partial_row_and_the_rerun_runs_only_the_rest(tiny, tmp_path):
    root, model, corpus = tiny
    out = tmp_path / "three.csv"
    cases = _tiny_cases(root, model, corpus, out, ("0", "0.5", "1"))
    listed = _write_cases(tmp_path / "three.txt", cases)
    worker = subprocess.Popen([sys.executable, "sweep.py", "--cases", str(listed), "--array-index", "0",
                               "--array-count", "1"], cwd=bench.REPO_DIR, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    started = 0
    for line in worker.stdout:  # the worker names each case as it starts it
        started += line.startswith("$ ")
        if started == 2:
            break
    time.sleep(1.0)  # the second case is loading or scoring
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and the case it runs
    worker.wait()
    folder = out.with_name("three.d")
    assert [p.name for p in bench.row_files(out)] == [f"{cases[0].id}.csv"]  # the first case's row, whole
    assert [row["command"] for row in bench.read_rows(cases[0].row_file)] == [cases[0].command]
    assert not out.exists() and all(p.name.startswith(".") for p in folder.iterdir() if p.suffix != ".csv")
    rerun = _sweep("--cases", str(listed))
    assert rerun.returncode == 0, rerun.stderr
    assert "three: 3 cases, 1 done, 2 to run" in rerun.stdout
    assert [line for line in rerun.stdout.splitlines() if line.startswith("$ ")] == \
        [f"$ {case.command}" for case in cases[1:]]
    assert [row["command"] for row in bench.read_rows(out)] == [case.command for case in cases]


def test_report_merges_the_rows_waiting_before_it_reads(tmp_path):
    """sweep.merge_results, which report.py runs first: a suite in case order, any other CSV by file name."""
    cases = sweep.suite_cases("distance", tmp_path / "distance.csv")
    for case in (cases[3], cases[1]):
        _row_file(case.row_file, [[case.command, "1"]])
    _row_file(tmp_path / "mine.d" / "b.csv", [["python b", "2"]])
    _row_file(tmp_path / "mine.d" / "a.csv", [["python a", "1"]])
    assert sweep.merge_results(tmp_path) == [(tmp_path / "distance.csv", 2), (tmp_path / "mine.csv", 2)]
    assert [r["command"] for r in bench.read_rows(tmp_path / "distance.csv")] == [cases[1].command, cases[3].command]
    assert [r["command"] for r in bench.read_rows(tmp_path / "mine.csv")] == ["python a", "python b"]
    assert sweep.merge_results(tmp_path) == []
