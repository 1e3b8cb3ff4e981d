"""bench.cli: the shared command line (flags, defaults, one-line errors), and layer selection."""
import pytest
import torch

import bench


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


@pytest.fixture
def any_results_dir(monkeypatch):
    """For tests of the default --out, which finish_args checks: whatever schema the CSVs under
    results/ have now, writable or not (check_output has tests of its own, and results/ is migrated
    separately)."""
    monkeypatch.setattr(bench.cli, "check_output", lambda *args: None)


def test_every_flag_has_help():
    for variant in (None, *bench.VARIANTS):
        for action in bench.build_parser(variant)._actions:
            assert action.help, f"{action.option_strings} of {variant} has no help"


def test_defaults(tmp_path):
    args = _parse(["--out", str(tmp_path / "x.csv")])
    assert (args.model, args.quant, args.layers, args.alpha) == ("smollm2-135m", "nf4", "even", 1.0)
    assert (args.max_new_tokens, args.warmup, args.repeats, args.seed) == (32, 1, 3, 0)
    assert (args.ppl_ctx, args.ppl_stride, args.ppl_max_tokens) == (512, 512, 2048)
    assert args.ppl_dataset == "wiki-embedded"  # embedded alias: the offline corpus
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.cache_dir == bench.default_cache_dir()
    assert args.baseline_csv == tmp_path / "baseline.csv"
    assert args.prefetch is None and args.kv_cache  # no stream flags outside the stream variant


def test_default_out_is_per_variant(any_results_dir):
    assert _parse([], "baseline").out == bench.RESULTS_DIR / "baseline.csv"
    assert _parse([], "diskoffload").out == bench.RESULTS_DIR / "diskoffload.csv"
    assert _parse(["--variant", "kvcache"], None).out == bench.RESULTS_DIR / "ppl.csv"
    assert _parse([], "baseline").baseline_csv == bench.RESULTS_DIR / "baseline.csv"


def test_ppl_dataset_default_follows_the_model(tmp_path, any_results_dir):
    assert bench.default_ppl_dataset("gemma3-270m") == "wiki-embedded"
    assert bench.default_ppl_dataset(str(tmp_path)) == "wiki-embedded"
    assert bench.default_ppl_dataset("HuggingFaceTB/SmolLM2-135M") == "wikitext2"
    assert _parse(["--model", "org/name", "--ppl-dataset", "short"]).ppl_dataset == "short"


def test_stream_flags(tmp_path):
    args = _parse(["--device", "cpu", "--out", str(tmp_path / "d.csv")], "diskoffload")
    assert (args.prefetch, args.budget, args.io_bandwidth, args.kv_cache) == (bench.CPU_DEFAULT_PREFETCH, 0, None, True)
    args = _parse(["--device", "cpu", "--prefetch", "3", "--budget", "8Mi", "--io-bandwidth", "600M",
                   "--no-kv-cache", "--cpu-read", "copy", "--out", str(tmp_path / "d.csv")], "diskoffload")
    assert (args.prefetch, args.budget, args.io_bandwidth, args.kv_cache) == (3, 8 * 2**20, 600_000_000, False)


@pytest.mark.parametrize("variant, argv, cpu_read", [
    ("kvcache", [], "map"), ("diskoffload", [], "map"), (None, [], "map"),  # eval_ppl patches too
    ("kvcache", ["--cpu-read", "copy"], "copy"), ("diskoffload", ["--cpu-read", "map"], "map"),
    ("baseline", [], None),  # nothing patched: no flag
])
def test_cpu_read_flag(variant, argv, cpu_read, tmp_path):
    assert _parse([*argv, "--out", str(tmp_path / "x.csv")], variant).cpu_read == cpu_read


@pytest.mark.parametrize("flags, message, attribute, value", [
    (["--io-bandwidth", "600M"], "--io-bandwidth throttles layer reads.*add --cpu-read copy", "io_bandwidth",
     600_000_000),
    (["--cold"], "--cold drops a layer file's pages before each read.*keeps it for the whole decode: "
                 "add --cpu-read copy", "cold", True),
])
def test_throttled_and_cold_reads_need_the_copy_path_on_a_cpu(flags, message, attribute, value, tmp_path):
    argv = ["--device", "cpu", *flags, "--out", str(tmp_path / "d.csv")]
    with pytest.raises(bench.UsageError, match=message):
        _parse(argv, "diskoffload")
    assert getattr(_parse([*argv, "--cpu-read", "copy"], "diskoffload"), attribute) == value


@pytest.mark.parametrize("argv, message", [
    (["--budget", "12X"], "argument --budget: invalid size '12X'"),
    (["--io-bandwidth", "0"], "argument --io-bandwidth: invalid rate '0'"),
    (["--prefetch", "-1"], "argument --prefetch: -1 is too small"),
    (["--repeats", "0"], "argument --repeats: 0 is too small"),
    (["--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
    (["--cpu-read", "mmap"], "argument --cpu-read: invalid choice: 'mmap'"),
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


def test_main_turns_usage_errors_into_exit_2(capsys, tmp_path):
    def fails(args):
        raise bench.UsageError("something is wrong")
    with pytest.raises(SystemExit) as exit_:
        bench.main(fails, bench.build_parser("baseline", prog="run_baseline.py"), ["--out", str(tmp_path / "x.csv")])
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


