"""bench.py's command line, decode loop, result rows and summary (tiny models, no downloads)."""
import csv
import dataclasses
import re

import pytest
import torch
from conftest import tiny_model

import bench
import offload_skip

# The issue-3 contract: these columns exist, under these names.
CONTRACT = ("variant model quant device device_name layers_offloaded n_layers alpha standby_bytes peak_bytes "
            "ppl ppl_dataset ppl_ctx ppl_tokens prefill_s decode_tok_s generate_tok_s load_s torch "
            "transformers bitsandbytes commit timestamp").split()
ISSUE4 = ("mode prefetch budget_bytes io_bandwidth kv_cache max_new_tokens repeats loads loaded_bytes layer_load_s "
          "per_layer_load_ms wait_s forward_s overlap decode_ms_per_tok layers ppl_stride cuda_allocated_bytes "
          "cuda_max_allocated_bytes rss_bytes torch_threads machine python").split()


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("text, nbytes", [
    ("0", 0), ("1234", 1234), ("64K", 64_000), ("64k", 64_000), ("600M", 600_000_000), ("1.5G", 1_500_000_000),
    ("2T", 2 * 10**12), ("64KB", 64_000), ("64Ki", 65_536), ("32MiB", 32 * 2**20), ("1Gi", 2**30),
    (" 8 M ", 8_000_000), ("100b", 100), (".5K", 500),
])
def test_parse_size(text, nbytes):
    assert bench.parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "M", "12X", "1.2.3", "-5M", "5 MB/s", "1e9", "64i", "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        bench.parse_size(text)


# --------------------------------------------------------------------------- parser

def _parse(argv, variant="kvcache"):
    return bench.finish_args(bench.build_parser(variant).parse_args(argv))


def test_every_flag_has_help():
    for variant in (None, *bench.VARIANTS):
        for action in bench.build_parser(variant)._actions:
            assert action.help, f"{action.option_strings} of {variant} has no help"


def test_defaults(tmp_path):
    args = _parse(["--out", str(tmp_path / "x.csv")])
    assert (args.model, args.quant, args.layers, args.alpha) == ("smollm2-135m", "nf4", "even", 1.0)
    assert (args.max_new_tokens, args.warmup, args.repeats, args.seed) == (64, 1, 3, 0)
    assert (args.ppl_ctx, args.ppl_stride, args.ppl_max_tokens) == (512, 512, 8192)
    assert args.ppl_dataset == "wiki-embedded"  # embedded alias: the offline corpus
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.cache_dir == bench.default_cache_dir()
    assert args.baseline_csv == tmp_path / "baseline.csv"
    assert args.prefetch is None and args.kv_cache  # no stream flags outside the stream variant


def test_default_out_is_per_variant():
    assert _parse([], "baseline").out == bench.RESULTS_DIR / "baseline.csv"
    assert _parse([], "diskoffload").out == bench.RESULTS_DIR / "diskoffload.csv"
    assert _parse(["--variant", "kvcache"], None).out == bench.RESULTS_DIR / "ppl.csv"
    assert _parse([], "baseline").baseline_csv == bench.RESULTS_DIR / "baseline.csv"


def test_ppl_dataset_default_follows_the_model(tmp_path):
    assert bench.default_ppl_dataset("gemma3-270m") == "wiki-embedded"
    assert bench.default_ppl_dataset(str(tmp_path)) == "wiki-embedded"
    assert bench.default_ppl_dataset("HuggingFaceTB/SmolLM2-135M") == "wikitext2"
    assert _parse(["--model", "org/name", "--ppl-dataset", "short"]).ppl_dataset == "short"


def test_stream_flags(tmp_path):
    args = _parse(["--device", "cpu", "--out", str(tmp_path / "d.csv")], "diskoffload")
    assert (args.prefetch, args.budget, args.io_bandwidth, args.kv_cache) == (bench.CPU_DEFAULT_PREFETCH, 0, None, True)
    args = _parse(["--device", "cpu", "--prefetch", "3", "--budget", "8Mi", "--io-bandwidth", "600M",
                   "--no-kv-cache", "--out", str(tmp_path / "d.csv")], "diskoffload")
    assert (args.prefetch, args.budget, args.io_bandwidth, args.kv_cache) == (3, 8 * 2**20, 600_000_000, False)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "12X"], "argument --budget: invalid size '12X'"),
    (["--io-bandwidth", "0"], "argument --io-bandwidth: invalid rate '0'"),
    (["--prefetch", "-1"], "argument --prefetch: -1 is too small"),
    (["--repeats", "0"], "argument --repeats: 0 is too small"),
    (["--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
])
def test_parser_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.build_parser("diskoffload", prog="run_diskoffload.py").parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"run_diskoffload.py: error: {message}")


def test_stride_longer_than_ctx_is_refused():
    with pytest.raises(bench.UsageError, match="--ppl-stride 600 is larger than --ppl-ctx 512"):
        _parse(["--ppl-stride", "600"])


def test_main_turns_usage_errors_into_exit_2(capsys):
    def fails(args):
        raise bench.UsageError("something is wrong")
    with pytest.raises(SystemExit) as exit_:
        bench.main(fails, bench.build_parser("baseline", prog="run_baseline.py"), ["--out", "/dev/null/x.csv"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "run_baseline.py: error: something is wrong\n"


# --------------------------------------------------------------------------- layers and corpus

def test_select_wraps_bad_patterns():
    assert bench.select("even", 30) == list(range(2, 27, 2))
    with pytest.raises(bench.UsageError, match="--layers: layer pattern 'evens'"):
        bench.select("evens", 30)


def test_missing_corpus_file(tmp_path):
    with pytest.raises(bench.UsageError, match="corpus file .*missing.txt not found"):
        bench.load_corpus(str(tmp_path / "missing.txt"))


# --------------------------------------------------------------------------- decode loop

@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_decode_matches_generate(model):
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (1, 9))
    with_cache = bench.decode(model, ids, 6, kv_cache=True)
    without_cache = bench.decode(model, ids, 6, kv_cache=False)
    seconds, generated = bench.generate(model, ids, 6)
    assert with_cache.tokens.shape == (1, 6)
    assert torch.equal(with_cache.tokens, generated)
    assert torch.equal(without_cache.tokens, generated)
    assert with_cache.prefill_s >= 0 and with_cache.decode_s >= 0 and seconds >= 0


def test_decode_through_a_session_equals_resident(tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 96, (1, 7))
    expected = bench.decode(model, ids, 5).tokens
    ctl = offload_skip.patch_model(model, "even", tmp_path, mode="session", progress=False)
    entered = []

    def session():
        entered.append(1)
        return ctl.session()
    assert torch.equal(bench.decode(model, ids, 5, context=session).tokens, expected)
    assert entered == [1]
    assert ctl.resident_bytes() < offload_skip.tensor_bytes(offload_skip.module_tensors(tiny_model("qwen2")))


# --------------------------------------------------------------------------- rows

def test_columns_document_every_field():
    assert bench.FIELDS == tuple(f.name for f in dataclasses.fields(bench.Result))
    assert list(bench.COLUMNS) == list(bench.FIELDS)
    assert set(CONTRACT) <= set(bench.FIELDS) and set(ISSUE4) <= set(bench.FIELDS)
    assert all(text.strip() for text in bench.COLUMNS.values())
    assert dataclasses.is_dataclass(bench.Result) and bench.Result.__dataclass_params__.frozen


def _row(**changes) -> bench.Result:
    values = {name: None for name in bench.FIELDS}
    values.update(variant="baseline", model="m", quant="fp32", device="cpu", device_name="CPU: x", layers="",
                  layers_offloaded="", n_layers=8, mode="resident", kv_cache=True, seed=0, standby_bytes=1000,
                  peak_bytes=1000, load_s=0.5, ppl=12.5, ppl_dataset="short", ppl_ctx=64, ppl_stride=64,
                  ppl_tokens=90, prefill_s=0.01, decode_tok_s=50.0, generate_tok_s=40.0, **bench.environment())
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


def test_environment_columns():
    env = bench.environment()
    assert env["torch"] == torch.__version__ and env["transformers"] and env["python"]
    assert re.fullmatch(r"([0-9a-f]{4,40}(-dirty)?)?", env["commit"])
    assert env["timestamp"].endswith("+00:00") and env["torch_threads"] >= 1
    assert bench.device_name(torch.device("cpu")).startswith("CPU: ")


def test_git_commit_outside_a_checkout(tmp_path):
    assert bench.git_commit(tmp_path) == ""


def test_summary_against_baseline(tmp_path):
    path = tmp_path / "baseline.csv"
    bench.append_row(path, _row(model="other"))
    bench.append_row(path, _row())
    variant = _row(variant="kvcache", layers="even", layers_offloaded="2 4", alpha=1.0, mode="session",
                   standby_bytes=750, peak_bytes=1000, decode_tok_s=45.0, generate_tok_s=None, loads=2.0,
                   loaded_bytes=250.0, layer_load_s=0.002, per_layer_load_ms=1.0, wait_s=0.002, forward_s=0.1,
                   overlap=0.0)
    baseline = bench.latest_baseline(path, variant)
    assert baseline["model"] == "m"
    text = bench.summary(variant, baseline)
    assert text.startswith("kvcache: m fp32 on cpu, 2 of 8 layers offloaded (even), alpha 1")
    assert "75.0% of baseline" in text and "0.90x baseline 50.0 tok/s" in text and "(baseline 12.5)" in text
    assert "2 layer loads" in text
    alone = bench.summary(variant, None)
    assert "baseline" not in alone.split("\n", 1)[1]
    assert bench.latest_baseline(tmp_path / "none.csv", variant) is None
