"""End-to-end runs of run_*.py, eval_ppl.py and report.py on a tiny random checkpoint.

The scripts' main(argv) runs in-process (fast); a few subprocess runs check what a user
sees on bad input: exit code 2 and one line on stderr, no traceback. Everything is written
under tmp_path; no timing assertions.
"""
import contextlib
import io
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import NF4_KINDS, force_nf4_path
from tiny_checkpoint import save_tiny_checkpoint

import bench
import eval_ppl
import offload_skip
import report
import run_baseline
import run_diskoffload
import run_kvcache

N_LAYERS = 8
CORPUS = ("Wikipedia is a free online encyclopedia, written and maintained by a community of volunteers.\n\n"
          "The printing press made books cheaper, and reading spread across Europe within a century.\n\n") * 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    checkpoint = save_tiny_checkpoint(root / "tiny", n_layers=N_LAYERS)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return root, checkpoint, corpus


def _argv(setup, out, *extra, quant="fp32"):
    root, checkpoint, corpus = setup
    return ["--model", str(checkpoint), "--quant", quant, "--device", "cpu", "--cache-dir", str(root / "cache"),
            "--prompt", "Once upon a time", "--max-new-tokens", "5", "--warmup", "1", "--repeats", "2",
            "--ppl-dataset", str(corpus), "--ppl-ctx", "32", "--ppl-max-tokens", "200", "--out", str(out), *extra]


def _quiet_machine():
    """bench.measure._cpu_sample on a machine where only this process runs."""
    wall, _, own = _real_cpu_sample()
    return wall, own, own


_real_cpu_sample = bench.measure._cpu_sample


@pytest.fixture(scope="module")
def results(setup):
    """One run of every script into <root>/results; returns (dir, {name: rows}, {name: stdout})."""
    root = setup[0]
    out = root / "results"
    printed = {}
    for name, module, extra in (
        ("baseline", run_baseline, ()),
        ("kvcache", run_kvcache, ()),
        ("diskoffload", run_diskoffload, ()),
        ("diskoffload", run_diskoffload, ("--no-kv-cache", "--prefetch", "0", "--budget", "1Ki",
                                          "--io-bandwidth", "500M", "--cpu-read", "copy")),
        ("ppl", eval_ppl, ("--variant", "diskoffload", "--ppl-stride", "16")),
    ):
        argv = _argv(setup, out / f"{name}.csv", *extra)
        if module is eval_ppl:  # eval_ppl has no decode-timing flags
            argv = [a for a in argv if a not in ("--prompt", "Once upon a time", "--max-new-tokens", "5",
                                                 "--warmup", "1", "--repeats", "2")]
        # The machine's own load must not decide what the report shows: these runs see a quiet
        # machine (the busy flag has tests of its own).
        with contextlib.redirect_stdout(io.StringIO()) as stdout, pytest.MonkeyPatch.context() as patch:
            patch.setattr(bench.measure, "_cpu_sample", _quiet_machine)
            assert module.main(argv) == 0
        printed.setdefault(name, []).append(stdout.getvalue())
    rows = {path.stem: bench.read_rows(path) for path in out.glob("*.csv")}
    return out, rows, printed


def _n(value):
    return bench.number(value)


def test_every_file_has_the_result_schema(results):
    out, rows, _ = results
    assert sorted(rows) == ["baseline", "diskoffload", "kvcache", "ppl"]
    for path in out.glob("*.csv"):
        header = path.read_text(encoding="utf-8").splitlines()[0]
        assert tuple(header.split(",")) == bench.FIELDS
    assert [len(rows[name]) for name in ("baseline", "kvcache", "diskoffload", "ppl")] == [1, 1, 2, 1]


def test_baseline_row(results):
    row = results[1]["baseline"][0]
    assert (row["variant"], row["mode"], row["layers"], row["layers_offloaded"], row["n_layers"]) == (
        "baseline", "resident", "", "", str(N_LAYERS))
    assert row["quant"] == "fp32" and row["device"] == "cpu" and row["device_name"].startswith("CPU: ")
    assert _n(row["standby_bytes"]) > 0 and row["peak_bytes"] == row["standby_bytes"]
    assert _n(row["rss_bytes"]) > _n(row["standby_bytes"])
    assert row["cuda_allocated_bytes"] == "" and row["cuda_max_allocated_bytes"] == ""
    assert _n(row["decode_tok_s"]) > 0 and _n(row["generate_tok_s"]) > 0 and _n(row["prefill_s"]) > 0
    assert _n(row["decode_ms_per_tok"]) == pytest.approx(1000 / _n(row["decode_tok_s"]), rel=1e-3)
    assert _n(row["load_s"]) > 0 and row["loads"] == "" and row["alpha"] == ""
    assert 1 < _n(row["ppl"]) < math.inf and _n(row["ppl_tokens"]) > 100
    assert (row["ppl_ctx"], row["ppl_stride"], row["max_new_tokens"], row["repeats"]) == ("32", "32", "5", "2")
    assert row["ppl_dataset"].endswith("corpus.txt") and row["kv_cache"] == "True"
    assert row["torch"] and row["transformers"] and row["python"] and row["timestamp"]
    assert row["cpu_read"] == "" and row["baseline_rss_anon_bytes"] == ""  # nothing patched


def test_every_row_splits_its_rss(results):
    """Anonymous and file-backed pages, read just after the RSS: about what it is made of."""
    for row in (r for rows in results[1].values() for r in rows):
        anon, file, rss = _n(row["rss_anon_bytes"]), _n(row["rss_file_bytes"]), _n(row["rss_bytes"])
        assert re.fullmatch(r"\d+", row["rss_anon_bytes"]) and re.fullmatch(r"\d+", row["rss_file_bytes"])
        assert anon > 0 and file > 0 and anon + file <= 1.1 * rss
        if row["variant"] != "baseline":
            assert _n(row["baseline_rss_anon_bytes"]) > 0


def test_kvcache_row(results):
    _, rows, printed = results
    base, row = rows["baseline"][0], rows["kvcache"][0]
    offloaded = offload_skip.select_layers(N_LAYERS, "even")
    assert (row["variant"], row["mode"], row["layers"], row["alpha"]) == ("kvcache", "session", "even", "1")
    assert row["layers_offloaded"] == " ".join(map(str, offloaded)) == "2 4"  # the pattern, resolved
    assert 0 < _n(row["standby_bytes"]) < _n(base["standby_bytes"])
    assert _n(row["peak_bytes"]) >= _n(base["standby_bytes"])  # a session loads every offloaded layer
    assert row["ppl"] == base["ppl"]  # alpha = 1: the same model, bit for bit
    assert _n(row["loads"]) == len(offloaded) and _n(row["loaded_bytes"]) > 0  # per run
    assert _n(row["decode_tok_s"]) > 0 and _n(row["generate_tok_s"]) > 0
    assert row["prefetch"] == "" and row["budget_bytes"] == "" and row["cpu_read"] == "map"
    # the same-run baseline: the unpatched model of this process, measured inside ctl.unpatched() and timed interleaved
    assert row["baseline_standby_bytes"] == base["standby_bytes"] and _n(row["baseline_rss_bytes"]) > 0
    assert _n(row["decode_ratio"]) == pytest.approx(
        _n(row["decode_tok_s"]) / _n(row["baseline_decode_tok_s"]), rel=1e-4)
    assert _n(row["generate_ratio"]) == pytest.approx(
        _n(row["generate_tok_s"]) / _n(row["baseline_generate_tok_s"]), rel=1e-4)
    summary = printed["kvcache"][0]
    assert summary.startswith("kvcache: ") and "% of the unpatched model's" in summary
    assert f"{_n(row['decode_ratio']):.3f}x the unpatched model's" in summary and "same run" in summary


def test_every_row_has_its_load_peak(results):
    """A patched variant stores its offloaded layers before loading the rest: its load peak
    (weights counted on the device) is the baseline's less the offloaded layers' bytes (the
    resident part outweighs one layer here); the host peak is measured in every row."""
    rows = results[1]
    base = rows["baseline"][0]
    assert base["load_peak_bytes"] == base["standby_bytes"]  # loaded whole
    for row in (rows["kvcache"][0], *rows["diskoffload"], rows["ppl"][0]):
        offloaded = _n(row["baseline_standby_bytes"]) - _n(row["standby_bytes"])
        assert _n(row["load_peak_bytes"]) == _n(base["load_peak_bytes"]) - offloaded == _n(row["standby_bytes"])
    for row in (r for name_rows in rows.values() for r in name_rows):
        assert _n(row["load_peak_host_bytes"]) > _n(row["load_peak_bytes"])  # torch and Python too


def test_every_row_has_its_own_run_id(results):
    ids = [r["run_id"] for rows in results[1].values() for r in rows]
    assert len(set(ids)) == len(ids) == 5 and all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)
    baseline = results[1]["baseline"][0]
    assert baseline["baseline_decode_tok_s"] == baseline["decode_ratio"] == ""  # nothing to pair with
    assert baseline["cpu_isa"] in ("avx512_bf16", "avx512f", "avx2", "other")


def test_diskoffload_rows(results):
    _, rows, printed = results
    base = rows["baseline"][0]
    default, slow = rows["diskoffload"]
    for row in (default, slow):
        assert row["mode"] == "stream" and row["layers_offloaded"] == "2 4"
        assert 0 < _n(row["standby_bytes"]) < _n(base["standby_bytes"])
        assert row["ppl"] == base["ppl"] and _n(row["decode_tok_s"]) > 0 and row["generate_tok_s"] == ""
        # copied: each of the 2 layers read for each of the 5 tokens; mapped: once per inference
        assert _n(row["loads"]) == (2 if row["cpu_read"] == "map" else 2 * 5) and _n(row["per_layer_load_ms"]) > 0
        assert 0 <= _n(row["overlap"]) <= 1 and _n(row["wait_s"]) >= 0 and _n(row["forward_s"]) > 0
        if sys.platform == "linux":  # sampled over one more, untimed, decode
            assert _n(row["peak_rss_anon_bytes"]) > 0
    assert (default["prefetch"], default["budget_bytes"], default["io_bandwidth"], default["kv_cache"]) == (
        str(bench.CPU_DEFAULT_PREFETCH), "0", "", "True")
    assert (slow["prefetch"], slow["budget_bytes"], slow["io_bandwidth"], slow["kv_cache"]) == (
        "0", "1024", "500000000", "False")
    assert (default["cpu_read"], slow["cpu_read"]) == ("map", "copy")
    assert "layer files mapped, not copied" in printed["diskoffload"][0]
    assert "layers read into buffers" in printed["diskoffload"][1]
    # peak <= standby + (prefetch + 2) x the largest offloaded layer (issue 4)
    layer_bytes = (_n(base["standby_bytes"]) - _n(default["standby_bytes"])) / 2
    assert _n(default["peak_bytes"]) <= _n(default["standby_bytes"]) + (bench.CPU_DEFAULT_PREFETCH + 2) * layer_bytes * 1.1
    assert "stream prefetch 0" in printed["diskoffload"][1] and "no KV cache" in printed["diskoffload"][1]


def test_eval_ppl_row(results):
    _, rows, _ = results
    row = rows["ppl"][0]
    assert (row["variant"], row["mode"], row["ppl_stride"]) == ("diskoffload", "stream", "16")
    assert 1 < _n(row["ppl"]) < math.inf and _n(row["ppl_tokens"]) == 199  # overlapping: all but the first
    assert row["decode_tok_s"] == row["max_new_tokens"] == row["kv_cache"] == "" and _n(row["peak_bytes"]) > 0
    assert row["cpu_read"] == "map"


def test_nf4_kvcache(setup, tmp_path, capsys):
    out = tmp_path / "kv.csv"
    assert run_kvcache.main(_argv(setup, out, "--ppl-max-tokens", "64", quant="nf4")) == 0
    row = bench.read_rows(out)[0]
    assert row["quant"] == "nf4" and row["layers_offloaded"] == "2 4" and _n(row["loads"]) == 2
    assert 1 < _n(row["ppl"]) < math.inf and _n(row["standby_bytes"]) < _n(row["peak_bytes"])
    assert "kvcache: " in capsys.readouterr().out


def _parts_sum(row) -> float:
    return sum(_n(row[k]) for k in ("embedding_bytes", "head_bytes", "resident_layers_bytes", "other_bytes"))


def test_rows_split_the_standby_bytes_into_parts(results):
    _, rows, _ = results
    for row in [r for name in rows for r in rows[name]]:
        assert _parts_sum(row) == _n(row["standby_bytes"])
        assert _n(row["offloaded_buffer_bytes"]) == _n(row["peak_bytes"]) - _n(row["standby_bytes"])
        assert (row["quant_head"], row["embedding_residency"], row["tied_embeddings"]) == ("none", "resident", "False")
    base, kv = rows["baseline"][0], rows["kvcache"][0]
    assert _n(base["offloaded_buffer_bytes"]) == 0 and _n(base["embedding_bytes"]) > 0
    assert kv["embedding_bytes"] == base["embedding_bytes"] and kv["head_bytes"] == base["head_bytes"]
    assert _n(kv["resident_layers_bytes"]) < _n(base["resident_layers_bytes"])


@pytest.mark.parametrize("head", NF4_KINDS)
@pytest.mark.parametrize("module", [run_kvcache, run_diskoffload])
def test_embedding_rows_from_disk_and_nf4_head(results, setup, tmp_path, module, head, monkeypatch):
    # the tiny vocabulary (98) is no multiple of 32: on the packed path the head stays unpacked
    force_nf4_path(head, monkeypatch)
    base, kv = results[1]["baseline"][0], results[1]["kvcache"][0]
    out = tmp_path / "beyond.csv"
    assert module.main(_argv(setup, out, "--offload-embeddings")) == 0
    assert module.main(_argv(setup, out, "--offload-embeddings", "--quant-head", "nf4")) == 0
    exact, nf4 = bench.read_rows(out)
    assert exact["embedding_residency"] == nf4["embedding_residency"] == "disk"
    assert exact["embedding_bytes"] == nf4["embedding_bytes"] == "0"
    assert _n(exact["standby_bytes"]) == _n(kv["standby_bytes"]) - _n(base["embedding_bytes"])
    assert exact["ppl"] == base["ppl"]  # the rows are the stored bytes: exact
    assert (exact["quant_head"], nf4["quant_head"]) == ("none", "nf4")
    assert 0 < _n(nf4["head_bytes"]) < _n(base["head_bytes"]) / 3  # 4-bit codes plus their scales
    assert nf4["ppl"] != base["ppl"]  # approximate by design
    for row in (exact, nf4):
        assert _parts_sum(row) == _n(row["standby_bytes"])


def test_ppl_skipped_with_zero_tokens(setup, tmp_path):
    out = tmp_path / "b.csv"
    assert run_baseline.main(_argv(setup, out, "--ppl-max-tokens", "0", "--ppl-dataset", "no-such-corpus")) == 0
    row = bench.read_rows(out)[0]
    assert row["ppl"] == row["ppl_dataset"] == row["ppl_tokens"] == ""


@pytest.mark.parametrize("module, extra, message", [
    (run_kvcache, ["--layers", "evens"], "--layers: layer pattern 'evens': cannot read 'evens'"),
    (run_kvcache, ["--layers", "9"], "--layers: layer pattern '9': layer 9 is out of range (model has layers 0..7)"),
    (run_diskoffload, ["--budget", "12X"], "argument --budget: invalid size '12X'"),
    (run_baseline, ["--ppl-dataset", "/no/such/corpus.txt"], "corpus file /no/such/corpus.txt not found"),
    (eval_ppl, ["--variant", "kvcache", "--ppl-max-tokens", "0"], "--ppl-max-tokens 0 leaves nothing to evaluate"),
    (run_baseline, ["--offload-embeddings"], "--offload-embeddings needs a patched variant (kvcache or diskoffload)"),
    (eval_ppl, ["--offload-embeddings"], "--offload-embeddings needs a patched variant"),
    (run_kvcache, ["--quant-head", "int3"], "argument --quant-head: invalid choice: 'int3'"),
    (run_diskoffload, ["--cpu-read", "mmap"], "argument --cpu-read: invalid choice: 'mmap' (choose from"),
    (run_baseline, ["--cpu-read", "copy"], "unrecognized arguments: --cpu-read copy"),
    (run_diskoffload, ["--io-bandwidth", "500M"], "--io-bandwidth throttles layer reads"),
    (run_diskoffload, ["--cold"], "--cold drops a layer file's pages before each read"),
])
def test_cli_errors(setup, tmp_path, capsys, module, extra, message):
    out = tmp_path / "x.csv"
    argv = _argv(setup, out, *extra)
    if module is eval_ppl:
        argv = [a for a in argv if a not in ("--prompt", "Once upon a time", "--max-new-tokens", "5",
                                             "--warmup", "1", "--repeats", "2")]
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    prog = module.__name__ + ".py"
    assert err.endswith("\n") and err.splitlines()[-1].startswith(f"{prog}: error: {message}")
    assert not out.exists()


def test_the_model_is_named_before_the_corpus(setup, tmp_path, capsys, monkeypatch):
    """First cause first: an offline hub id fails at once, before the (also missing) corpus."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = _argv(setup, tmp_path / "x.csv", "--model", "org/nosuch", "--ppl-dataset", str(tmp_path / "none.txt"))
    with pytest.raises(SystemExit) as exit_:
        run_kvcache.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "run_kvcache.py: error: model 'org/nosuch' is not in the local Hugging Face cache and the hub is out of reach")


def test_the_corpus_is_read_only_when_perplexity_is_asked_for(setup, tmp_path):
    argv = _argv(setup, tmp_path / "x.csv", "--ppl-dataset", str(tmp_path / "none.txt"), "--ppl-max-tokens", "0")
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_baseline.main(argv) == 0
    (row,) = bench.read_rows(tmp_path / "x.csv")
    assert row["ppl"] == "" and float(row["decode_tok_s"]) > 0


def test_unknown_alias_and_other_schema(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_kvcache.main(_argv(setup, tmp_path / "x.csv", "--model", "no-such-model"))
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    old = tmp_path / "old.csv"
    old.write_text("variant,tok_s\nbaseline,3\n")
    with pytest.raises(SystemExit):
        run_baseline.main(_argv(setup, old))
    assert f"{old} has other columns" in capsys.readouterr().err
    assert old.read_text() == "variant,tok_s\nbaseline,3\n"


@pytest.mark.parametrize("script, extra, message", [
    ("run_kvcache.py", ["--model", "no-such-model"], "unknown model 'no-such-model'"),
    ("run_diskoffload.py", ["--budget", "3Q"], "argument --budget: invalid size '3Q'"),
])
def test_cli_error_in_a_real_process(tmp_path, script, extra, message):
    proc = subprocess.run([sys.executable, str(bench.REPO_DIR / script), "--out", str(tmp_path / "x.csv"), *extra],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{script}: error: {message}")
    assert proc.stdout == ""


# --------------------------------------------------------------------------- report.py

README = "# Title\n\nIntro | with a pipe.\n\n<!-- results:start -->\nstale table\n<!-- results:end -->\n\nTail text.\n"


def test_report_fills_the_markers_and_plots(results, tmp_path, capsys):
    out, rows, _ = results
    readme = tmp_path / "README.md"
    readme.write_text(README, encoding="utf-8")
    assert report.main(["--results", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    before, rest = text.split("<!-- results:start -->\n")
    table, after = rest.split("<!-- results:end -->")
    assert before == "# Title\n\nIntro | with a pipe.\n\n" and after == "\n\nTail text.\n"
    assert "stale table" not in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    every = [r for group in rows.values() for r in group]
    assert all(r["busy"] != "True" for r in every)  # a quiet machine, injected
    assert len(lines) == 1 + len(every)  # one machine here: header + one line per CSV row
    base = rows["baseline"][0]
    assert f"| {_n(base['standby_bytes']) / 1e6:.1f} |" in table
    assert "stream, prefetch 0, budget 0.0 MB, 500 MB/s, no KV cache" in table
    for name in ("memory.png", "speed.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # idempotent: a second run leaves the same README
    report.main(["--results", str(out), "--readme", str(readme), "--no-plots"])
    assert readme.read_text(encoding="utf-8") == text


def test_report_without_markers_prints_the_table(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# No markers here\n", encoding="utf-8")
    assert report.main(["--results", str(results[0]), "--readme", str(readme), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "| variant |" in captured.out and "no <!-- results:start -->" in captured.err
    assert readme.read_text(encoding="utf-8") == "# No markers here\n"


def test_report_columns(capsys):
    assert report.main(["--columns"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(bench.FIELDS)


# --------------------------------------------------------------------------- embedded model

def test_smoke_embedded_smollm2(tmp_path, capsys):
    """SmolLM2-135M NF4 through run_kvcache, if its converted checkpoint is already cached.
    The cached checkpoint is only read (passed as a directory); layer files go to tmp_path."""
    checkpoint = bench.default_cache_dir() / "hf" / "smollm2-135m"
    if not (checkpoint / bench.models._COMPLETE_MARKER).is_file():
        pytest.skip(f"embedded SmolLM2 not converted yet ({checkpoint}); `python run_kvcache.py` converts it once")
    out = tmp_path / "kv.csv"
    assert run_kvcache.main(["--model", str(checkpoint), "--device", "cpu", "--cache-dir", str(tmp_path),
                             "--max-new-tokens", "4", "--warmup", "0", "--repeats", "1",
                             "--ppl-dataset", "short", "--ppl-ctx", "128", "--out", str(out)]) == 0
    row = bench.read_rows(out)[0]
    assert (row["quant"], row["n_layers"]) == ("nf4", "30")
    assert row["layers_offloaded"] == " ".join(str(i) for i in range(2, 27, 2))  # 13 layers
    assert 1 < _n(row["ppl"]) < 1000 and _n(row["standby_bytes"]) < _n(row["peak_bytes"])


# --------------------------------------------------------------------------- check_exact.py

def test_check_exact_on_a_tiny_checkpoint(setup, tmp_path, capsys):
    import check_exact
    root, checkpoint, corpus = setup
    out = tmp_path / "exactness.csv"
    assert check_exact.main(["--model", str(checkpoint), "--device", "cpu", "--quants", "fp32,bf16,nf4",
                             "--corpus", str(corpus), "--window-tokens", "64", "--greedy-tokens", "6",
                             "--cache-dir", str(root / "cache"), "--out", str(out)]) == 0
    rows = bench.read_rows(out)
    assert [(r["quant"], r["form"]) for r in rows] == [
        (q, form) for q in ("fp32", "bf16", "nf4") for form in ("session", "stream", "naive")]
    for row in rows:
        assert _n(row["window_tokens"]) == 64 and _n(row["standby_bytes_before"]) > 0
        if row["form"] != "naive":  # alpha = 1: the original model, bit for bit, and the bytes are gone
            assert (row["max_abs_logit_diff"], row["logits_equal"], row["tokens_equal"]) == ("0", "True", "True")
            assert row["first_divergence"] == ""
            assert _n(row["saved_bytes"]) == _n(row["standby_bytes_before"]) - _n(row["standby_bytes_after"]) > 0
        else:
            assert row["saved_bytes"] == "0"
        assert row["command"].startswith("python check_exact.py --model ") and "--quants fp32,bf16,nf4" in row["command"]
    assert "rows appended to" in capsys.readouterr().out


def test_report_fills_every_named_section(results, tmp_path):
    out = results[0]
    (out / "exactness.csv").write_text("model,quant,device,device_name,layers,form,window_tokens,max_abs_logit_diff,"
                                       "logits_equal,greedy_tokens,tokens_equal,first_divergence,standby_bytes_before,"
                                       "standby_bytes_after,saved_bytes,cpu_isa,commit\n"
                                       "m,nf4,cpu,CPU: X,even,stream,64,0,True,6,True,,2000000,1000000,1000000,avx2,abc\n")
    readme = tmp_path / "README.md"
    names = ("results", "exactness", "estimate-reference", "estimate-check")
    readme.write_text("".join(f"<!-- {n}:start -->\n<!-- {n}:end -->\n" for n in names), encoding="utf-8")
    try:
        assert report.main(["--results", str(out), "--readme", str(readme), "--no-plots"]) == 0
    finally:
        (out / "exactness.csv").unlink()
    text = readme.read_text(encoding="utf-8")
    assert "#### CPU: X (avx2)\n\n| model |" in text  # exactness is stated per machine kind
    assert "| m | nf4 | even | stream | 0 | True | True (6 tok) |  | 2.0 -> 1.0 | abc |" in text
    assert "Qwen2.5-3B NF4, layers 2..32 even (16 x 39.8 MB" in text
    assert "| model | machine | prefetch | reads | budget MB |" in text
    assert "exactness" not in text.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]


@pytest.mark.parametrize("module, cpu_read", [(run_kvcache, "copy"), (run_diskoffload, "map"),
                                              (run_diskoffload, "copy")])
def test_the_row_says_which_cpu_read_ran(setup, tmp_path, module, cpu_read):
    out = tmp_path / "rows.csv"
    extra = ["--cpu-read", cpu_read] + (["--prefetch", "1"] if module is run_diskoffload else [])
    argv = _argv(setup, out, *extra)
    argv[argv.index("--ppl-max-tokens") + 1] = "0"
    with contextlib.redirect_stdout(io.StringIO()):
        assert module.main(argv) == 0
    row = bench.read_rows(out)[0]
    assert row["cpu_read"] == cpu_read and _n(row["loads"]) > 0
    assert row["command"].endswith(" ".join(extra))


@pytest.mark.parametrize("module, extra", [
    (run_kvcache, ("--batch-size", "3")),
    (run_diskoffload, ("--batch-size", "3", "--prefetch", "1")),
    (run_diskoffload, ("--cold", "--cpu-read", "copy", "--prefetch", "2")),
])
def test_batch_and_cold_rows(setup, tmp_path, module, extra):
    out = tmp_path / "rows.csv"
    argv = _argv(setup, out, *extra)
    argv[argv.index("--ppl-max-tokens") + 1] = "0"
    with contextlib.redirect_stdout(io.StringIO()):
        assert module.main(argv) == 0
    row = bench.read_rows(out)[0]
    batch = 3 if "--batch-size" in extra else 1
    assert row["batch_size"] == str(batch)
    # tok/s counts every sequence's tokens: batch * (new tokens - 1) per decode time
    assert _n(row["decode_ms_per_tok"]) == pytest.approx(1000 * batch / _n(row["decode_tok_s"]), rel=1e-3)
    if module is run_diskoffload:
        assert row["cold_reads"] == str("--cold" in extra)
        assert (_n(row["cold_read_bytes_s"]) or 0) > 0 if "--cold" in extra else row["cold_read_bytes_s"] == ""


# --------------------------------------------------------------------------- nothing measured is lost

def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(bench.experiment, "load_model", refuse)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_folder_is_refused_before_loading(setup, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    _no_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        run_kvcache.main(_argv(setup, folder / "kvcache.csv"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"run_kvcache.py: error: cannot write the rows to {folder / 'kvcache.csv'} (PermissionError: Permission "
        "denied); fix its permissions or pass another --out")


@pytest.mark.parametrize("module", [run_baseline, run_kvcache, run_diskoffload, eval_ppl])
def test_an_unwritable_output_is_refused_before_loading(module, setup, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "rows.csv"  # its folder is a file: not even root makes it one
    _no_loading(monkeypatch)
    argv = _argv(setup, out)
    if module is eval_ppl:  # no decoding there
        argv = [a for a in argv if a not in ("--prompt", "Once upon a time", "--max-new-tokens", "5",
                                             "--warmup", "1", "--repeats", "2")]
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{module.__name__}.py: error: cannot write the rows to {out} (FileExistsError: File exists); "
        "fix its permissions or pass another --out")


def test_a_row_that_cannot_be_appended_at_the_end_is_saved_elsewhere(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "kvcache.csv"
    append_row = bench.csvio.append_row

    def out_refused(path, row):
        if path == out:
            raise PermissionError(13, "Permission denied")
        return append_row(path, row)
    monkeypatch.setattr(bench.csvio, "append_row", out_refused)
    with pytest.raises(SystemExit) as exit_:
        run_kvcache.main(_argv(setup, out))
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "kvcache: " in captured.out and "decode" in captured.out  # the summary came first
    line = captured.err.splitlines()[-1]
    saved = re.fullmatch(rf"run_kvcache.py: error: could not write to {re.escape(str(out))} \(PermissionError: "
                         r"Permission denied\); 1 row\(s\) saved in (\S+) instead", line)
    assert saved, line
    (row,) = bench.read_rows(saved.group(1))
    assert row["variant"] == "kvcache" and float(row["decode_tok_s"]) > 0
    os.unlink(saved.group(1))


def _interrupt(monkeypatch, owner, name, after=0):
    """KeyboardInterrupt from owner.name on its call number `after` (0: the first)."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("where, owner, name, after, kept", [
    ("loading", bench.experiment, "load_model", 0, ""),
    ("storing layers", offload_skip, "serialize_layer", 1, "; 1 of 2 layer files kept in {dir}, the next run stores "
                                                            "the rest"),
    ("timing", bench.measure, "decode", 2, ""),
])
def test_ctrl_c_is_one_line_exit_130_and_the_next_run_is_clean(where, owner, name, after, kept, setup, tmp_path,
                                                               capsys, monkeypatch):
    out = tmp_path / "kvcache.csv"
    argv = [*_argv(setup, out, "--layers", "2,4"), "--cache-dir", str(tmp_path / "cache")]
    with monkeypatch.context() as patched:
        _interrupt(patched, owner, name, after)
        assert run_kvcache.main(argv) == 130
    err = capsys.readouterr().err
    folders = list((tmp_path / "cache" / "layers").glob("*")) if (tmp_path / "cache" / "layers").exists() else []
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]  # a closed progress bar leaves a blank line
    assert lines[-1] == "run_kvcache.py: interrupted; no row written" + kept.format(
        dir=folders[0] if folders else "")
    assert not out.exists()
    assert run_kvcache.main(argv) == 0  # nothing to clean up by hand
    assert len(bench.read_rows(out)) == 1
