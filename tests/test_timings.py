"""timings.py (the wall time a user waits, appended to results/timings.csv) and
reporting/timings.py (README's how-long sentences, from that file and results/quickstart.txt)."""
import subprocess
import sys

import bench
import timings
from reporting import timings as how

CAPTURE = ("kvcache: smollm2-135m nf4 on cpu (AMD EPYC, avx512_bf16), 13 of 30 layers offloaded (even), alpha 1\n"
           "  decode            54.1 tok/s\n"
           "runtime: 22.306 s\n")


def test_a_job_is_run_from_the_repo_root_and_its_row_appended(tmp_path):
    ran = []

    def run(argv, cwd):
        ran.append((argv, cwd))
        return subprocess.CompletedProcess(argv, 3)
    out = tmp_path / "timings.csv"
    row = timings.record("tests", out, run=run)
    assert ran == [([sys.executable, "-m", "pytest"], bench.REPO_DIR)]
    assert (row.job, row.command, row.exit_code, row.cpus) == ("tests", "python -m pytest", 3, timings.cpus())
    assert row.wall_s >= 0 and row.cpu_name == bench.cpu_name() and row.cpu_isa == bench.cpu_isa() and row.timestamp
    (written,) = bench.read_rows(out)
    assert written["job"] == "tests" and written["exit_code"] == "3" and written["command"] == "python -m pytest"


def test_an_unknown_job_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "timings.py", "nosuch", "--out", str(tmp_path / "t.csv")],
                            cwd=bench.REPO_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("timings.py: error: argument job: invalid choice: 'nosuch'")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "t.csv").exists()


def test_how_long_reads_the_capture_and_the_passing_timings_fastest_and_slowest(tmp_path):
    assert how.how_long(tmp_path) == how.UNTIMED.format(csv="timings.csv")  # nothing yet: the commands
    (tmp_path / "quickstart.txt").write_text(CAPTURE, encoding="utf-8")
    assert how.runtime_s(CAPTURE) == 22.306
    assert how.captured_machine(CAPTURE) == "CPU: AMD EPYC (avx512_bf16)"
    row = dict(command="python run_kvcache.py", cpus=2, cpu_name="Intel X", cpu_isa="amx", load_avg_start=1.9,
               load_avg_end=2.4,
               commit="abc", timestamp="2026-01-02T00:00:00+00:00")
    for job, code, wall, stamp in (("main-job", 0, 179.4, "2026-01-02"), ("main-job", 1, 5.0, "2026-01-03"),
                                   ("tests", 0, 1500.0, "2026-01-01"), ("tests", 0, 1201.0, "2026-01-02")):
        bench.append_row(tmp_path / "timings.csv", timings.Timing(**{**row, "job": job, "exit_code": code,
                                                                     "wall_s": wall, "timestamp": stamp}))
    assert how.how_long(tmp_path) == (
        "The main job took 22 s on CPU: AMD EPYC (avx512_bf16), alone on the machine with the model already converted "
        "(`results/quickstart.txt`, from `bash reproduce.sh --quickstart`). With `python timings.py` "
        "(`results/timings.csv`): the main job (`python run_kvcache.py`) took 3 min (179 s) on Intel X (amx), 2 cores, load "
        "average 1.9 before and 2.4 after; the tests (`python -m pytest`) took 20 min (1201 s) with load average 1.9 "
        "before and 2.4 after, and 25 min (1500 s) with 1.9 and 2.4, on Intel X (amx), 2 cores.")
