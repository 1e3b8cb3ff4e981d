"""The row and its files: bench.schema (the row dataclasses, each column documented on its field),
bench.csvio (the CSV files), bench.summary (the printed lines), bench.provenance (the environment
columns); and the committed results/*.csv, which read back under this version's row types."""
import csv
import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

# The issue-3 contract: these columns exist, under these names.
CONTRACT = ("variant model quant device device_name layers_offloaded n_layers alpha standby_bytes peak_bytes "
            "ppl ppl_dataset ppl_ctx ppl_tokens prefill_s decode_tok_s generate_tok_s load_s torch "
            "transformers bitsandbytes commit timestamp").split()
ISSUE8 = ("run_id baseline_standby_bytes baseline_rss_bytes baseline_decode_tok_s baseline_generate_tok_s decode_ratio "
          "generate_ratio load_1m_before load_1m_after other_cpu_share busy cpu_isa").split()
ISSUE4 = ("mode prefetch budget_bytes io_bandwidth kv_cache max_new_tokens repeats loads loaded_bytes layer_load_s "
          "per_layer_load_ms wait_s forward_s overlap decode_ms_per_tok layers ppl_stride cuda_allocated_bytes "
          "cuda_max_allocated_bytes rss_bytes torch_threads machine python").split()


# --------------------------------------------------------------------------- rows

def test_columns_document_every_field():
    assert bench.FIELDS == tuple(f.name for f in dataclasses.fields(bench.Result))
    docs = bench.column_docs(bench.Result)
    assert list(docs) == list(bench.FIELDS)
    assert set(CONTRACT) | set(ISSUE4) | set(ISSUE8) <= set(bench.FIELDS)
    assert all(text.strip() for text in docs.values())
    assert dataclasses.is_dataclass(bench.Result) and bench.Result.__dataclass_params__.frozen



def test_the_busy_column_states_the_threshold_it_is_decided_by():
    # the comment cannot interpolate BUSY_OTHER_CPU_SHARE, so the two are checked here
    assert f"other_cpu_share > {bench.BUSY_OTHER_CPU_SHARE}: " in bench.column_docs(bench.Result)["busy"]


@bench.csv_row
class _Documented:
    # a heading at the fields' indentation is nobody's doc
    a: int  # first line
        # continued below, indented deeper
    b: str
    c: float  # alone
    # a heading here ends c's doc
    d: int  # last


def test_column_docs_read_each_fields_comment_and_its_continuation():
    assert bench.column_docs(_Documented) == {
        "a": "first line continued below, indented deeper", "c": "alone", "d": "last",
        "torch": "torch version", "transformers": "transformers version",
        "bitsandbytes": "bitsandbytes version (empty if not installed)", "python": "Python version",
        "torch_threads": "torch.get_num_threads()", "machine": "host name and CPU model",
        "cpu_isa": "widest CPU vector extension that matters here: avx512_bf16 (bitsandbytes' fused NF4 kernel), "
                   "avx512f, avx2 or other; NF4 results differ between them",
        "commit": "git rev-parse --short HEAD, '-dirty' if tracked .py files have uncommitted changes",
        "timestamp": "UTC time the row was written (ISO 8601)"}
    docs = bench.column_docs(bench.SpeculativeRow)
    assert docs["draft"] == "lookup, self:<kind>, or the draft model's name" and "model" not in docs
    assert list(bench.ENVIRONMENT_FIELDS) == [f.name for f in dataclasses.fields(bench.Environment)]
    assert bench.ENVIRONMENT_FIELDS["torch_threads"] is int and bench.ENVIRONMENT_FIELDS["commit"] is str


# results/<stem>.csv -> (module, row type) for the files that are not Result rows
OTHER_ROW_TYPES = {"block_influence": ("bench.importance", "InfluenceRow"), "exactness": ("check_exact", "Exactness"),
                   "peers": ("run_peers", "PeerRow"), "profile": ("profile_step", "ProfileRow"),
                   "speculative": ("bench.drafting", "SpeculativeRow"), "timings": ("timings", "Timing"),
                   "fit": ("run_fit", "FitRow")}
COMMITTED = sorted((bench.RESULTS_DIR).glob("*.csv"))


def test_every_committed_csv_has_a_row_type():
    stems = {path.stem for path in COMMITTED}
    assert set(OTHER_ROW_TYPES) <= stems and len(stems - set(OTHER_ROW_TYPES)) >= 10


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: path.name)
def test_a_committed_csv_reads_back_unchanged_under_its_row_type(path, tmp_path):
    module, name = OTHER_ROW_TYPES.get(path.stem, ("bench", "Result"))
    row_type = getattr(importlib.import_module(module), name)
    fields = [f.name for f in dataclasses.fields(row_type)]
    with path.open(newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == fields
    bench.check_csv(path, row_type)
    rows = bench.read_rows(path)
    # DictReader files a cell beyond the header under None and leaves a missing one None
    assert rows and all(list(row) == fields and None not in row.values() for row in rows)
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    assert bench.migrate_csv(copy, row_type) is False
    assert copy.read_bytes() == path.read_bytes()


# The rows' machine, fixed: the tests must pass on either CPU kind, whichever runs them.
MACHINE = {"machine": "test (AMD EPYC)", "cpu_isa": "avx2"}


def _row(**changes) -> bench.Result:
    values = {name: None for name in bench.FIELDS}
    values.update(variant="baseline", model="m", quant="fp32", device="cpu", device_name="CPU: x", layers="",
                  layers_offloaded="", n_layers=8, mode="resident", kv_cache=True, seed=0, standby_bytes=1000,
                  peak_bytes=1000, load_s=0.5, ppl=12.5, ppl_dataset="short", ppl_ctx=64, ppl_stride=64,
                  ppl_tokens=90, prefill_s=0.01, decode_tok_s=50.0, generate_tok_s=40.0, run_id="r1",
                  **{**bench.environment(), **MACHINE})
    values.update(changes)
    return bench.Result(**values)


def test_append_row_writes_the_header_once(tmp_path):
    path = tmp_path / "sub" / "rows.csv"
    bench.append_row(path, _row())
    bench.append_row(path, _row(variant="kvcache", alpha=0.5, io_bandwidth=600_000_000))
    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == bench.FIELDS and len(lines) == 3
    rows = bench.read_rows(path)
    assert [r["variant"] for r in rows] == ["baseline", "kvcache"]
    assert rows[1]["alpha"] == "0.5" and rows[0]["alpha"] == "" and rows[1]["io_bandwidth"] == "600000000"
    assert bench.number(rows[0]["ppl"]) == 12.5 and bench.number(rows[0]["rss_bytes"]) is None


def test_append_row_refuses_another_schema(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("variant,model,tok_s\nbaseline,m,3\n")
    with pytest.raises(bench.UsageError, match=re.escape(str(path)) + ".*other columns.*extra \\['tok_s'\\]"):
        bench.append_row(path, _row())
    assert path.read_text() == "variant,model,tok_s\nbaseline,m,3\n"
    reordered = tmp_path / "reordered.csv"
    reordered.write_text(",".join(reversed(bench.FIELDS)) + "\n")
    with pytest.raises(bench.UsageError, match="same columns in another order"):
        bench.check_csv(reordered)


def test_a_cpu_row_says_how_its_layers_came_in():
    assert "; layer files mapped, not copied" in bench.summary(_variant(cpu_read="map"))
    assert "; layers read into buffers" in bench.summary(_variant(cpu_read="copy"))
    assert "mapped" not in bench.summary(_variant()) and "buffers" not in bench.summary(_variant())
    text = bench.summary(_variant(rss_bytes=3_000_000, rss_anon_bytes=2_000_000, rss_file_bytes=900_000,
                                  baseline_rss_anon_bytes=2_500_000))
    assert "idle RSS parts  anonymous 2.0 MB, file-backed 0.9 MB; unpatched model's anonymous 2.5 MB" in text


# --------------------------------------------------------------------------- migrating a results file

def _old_file(path, columns, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def test_migrate_csv_adds_the_missing_columns_empty_and_keeps_every_value(tmp_path):
    new = ("cpu_read", "rss_anon_bytes", "rss_file_bytes", "baseline_rss_anon_bytes")
    old_columns = [name for name in bench.FIELDS if name not in new]
    rows = [[f"{name}-{k}" for name in old_columns] for k in range(3)]
    rows[1][old_columns.index("command")] = 'python run_x.py --prompt "a, b"'  # quoting survives
    path = tmp_path / "diskoffload.csv"
    _old_file(path, old_columns, rows)
    with pytest.raises(bench.UsageError, match="bring it to these columns with bench.migrate_csv"):
        bench.append_row(path, _row())
    assert bench.migrate_csv(path) is True
    migrated = bench.read_rows(path)
    assert tuple(migrated[0]) == bench.FIELDS and len(migrated) == 3
    for k, row in enumerate(migrated):
        assert all(row[name] == "" for name in new)
        assert [row[name] for name in old_columns] == rows[k]
    assert migrated[1]["command"] == 'python run_x.py --prompt "a, b"'
    assert not [p for p in tmp_path.iterdir() if p != path and p.suffix != ".lock"]  # no temporary file left (the lock file is append_row's)
    before = path.read_bytes()
    assert bench.migrate_csv(path) is False and path.read_bytes() == before  # already current: untouched
    bench.append_row(path, _row())  # the schema check passes now
    assert len(bench.read_rows(path)) == 4


def test_migrate_csv_reorders_and_leaves_empty_files_alone(tmp_path):
    path = tmp_path / "rows.csv"
    _old_file(path, ["model", "variant"], [["m", "kvcache"]])
    assert bench.migrate_csv(path) is True
    row = bench.read_rows(path)[0]
    assert (row["variant"], row["model"], row["ppl"]) == ("kvcache", "m", "")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert bench.migrate_csv(empty) is False and empty.read_text() == ""
    with pytest.raises(bench.UsageError, match="missing.csv is not a file"):
        bench.migrate_csv(tmp_path / "missing.csv")


@pytest.mark.parametrize("columns, rows, message", [
    (["variant", "model", "tok_s"], [["baseline", "m", "3"]], r"columns \['tok_s'\] are not Result columns"),
    (["variant", "model", "variant"], [["a", "m", "b"]], r"columns \['variant'\] appear twice"),
    (["variant", "model"], [["a", "m", "extra"]], "line 2 has 3 cells, the header 2 columns"),
])
def test_migrate_csv_refuses_what_it_would_lose(columns, rows, message, tmp_path):
    path = tmp_path / "other.csv"
    _old_file(path, columns, rows)
    before = path.read_bytes()
    with pytest.raises(bench.UsageError, match=re.escape(str(path)) + ": " + message):
        bench.migrate_csv(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["other.csv"]


def test_environment_columns():
    env = bench.environment()
    assert env["torch"] == torch.__version__ and env["transformers"] and env["python"]
    assert re.fullmatch(r"([0-9a-f]{4,40}(-dirty)?)?", env["commit"])
    assert env["timestamp"].endswith("+00:00") and env["torch_threads"] >= 1
    assert bench.device_name(torch.device("cpu")).startswith("CPU: ")


def test_git_commit_outside_a_checkout(tmp_path):
    assert bench.git_commit(tmp_path) == ""


def _variant(**changes) -> bench.Result:
    values = dict(variant="kvcache", layers="even", layers_offloaded="2 4", alpha=1.0, mode="session",
                  standby_bytes=750, peak_bytes=1000, decode_tok_s=45.0, generate_tok_s=None, loads=2.0,
                  loaded_bytes=250.0, layer_load_s=0.002, per_layer_load_ms=1.0, wait_s=0.002, forward_s=0.1,
                  overlap=0.0, run_id="r2", baseline_standby_bytes=1000, baseline_rss_bytes=None,
                  baseline_decode_tok_s=50.0, decode_ratio=0.9, other_cpu_share=0.01, busy=False)
    values.update(changes)
    return _row(**values)


def test_summary_ratios_come_from_the_same_run(tmp_path):
    path = tmp_path / "baseline.csv"
    bench.append_row(path, _row(model="other"))
    bench.append_row(path, _row(ppl=12.5))
    variant = _variant()
    baseline = bench.latest_baseline(path, variant)
    assert baseline["model"] == "m"
    text = bench.summary(variant, baseline)
    assert text.startswith("kvcache: m fp32 on cpu (x, avx2), 2 of 8 layers offloaded (even), alpha 1")
    assert "standby weights     0.0 MB  (75.0% of the unpatched model's standby weights, 0.0 MB)" in text
    assert "decode            45.0 tok/s  (0.900x the unpatched model's 50.0 tok/s, same run)" in text
    assert "(baseline row on this kind of machine: 12.5)" in text
    assert "2 layer loads" in text and "BUSY" not in text
    assert "baseline row" not in bench.summary(variant, None)
    assert bench.latest_baseline(tmp_path / "none.csv", variant) is None


@pytest.mark.parametrize("column, other", [("device_name", "CPU: another"), ("cpu_isa", "avx512_bf16"),
                                           ("bitsandbytes", "0.0.1"), ("quant", "nf4")])
def test_a_baseline_from_another_machine_changes_nothing(tmp_path, column, other):
    path = tmp_path / "baseline.csv"
    bench.append_row(path, _row(**{column: other, "decode_tok_s": 999.0, "ppl": 99.0}))
    variant = _variant()
    assert bench.latest_baseline(path, variant) is None
    assert bench.summary(variant, bench.latest_baseline(path, variant)) == bench.summary(variant, None)
    assert "0.900x the unpatched model's 50.0 tok/s" in bench.summary(variant, None)


def test_a_busy_row_says_so():
    text = bench.summary(_variant(other_cpu_share=0.42, busy=True))
    assert "BUSY: other processes used 42% of the CPU while timing" in text


def test_cpu_isa_is_one_of_the_known_names():
    assert bench.environment()["cpu_isa"] in ("avx512_bf16", "avx512f", "avx2", "other")



APPEND_50 = """
import pathlib, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import bench
from test_results import _row
rows = [_row(run_id=f"{{sys.argv[1]}}-{{k}}") for k in range(50)]
ready = pathlib.Path({ready!r})
(ready / sys.argv[1]).touch()
while len(list(ready.iterdir())) < 4:  # a barrier: every writer released once all four are ready
    time.sleep(0.001)
for row in rows:
    bench.append_row({path!r}, row)
"""


def test_four_processes_appending_at_once_write_one_header_and_every_row(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    path, ready = tmp_path / "new" / "rows.csv", tmp_path / "ready"
    ready.mkdir()
    code = APPEND_50.format(repo=str(repo), tests=str(repo / "tests"), ready=str(ready), path=str(path))
    procs = [subprocess.Popen([sys.executable, "-c", code, f"w{k}"], stderr=subprocess.PIPE, text=True)
             for k in range(4)]
    assert [(p.wait(timeout=300), p.stderr.read()) for p in procs] == [(0, "")] * 4
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(bench.FIELDS) and lines.count(lines[0]) == 1
    ids = sorted(r["run_id"] for r in bench.read_rows(path))
    assert ids == sorted(f"w{k}-{i}" for k in range(4) for i in range(50))
