"""The perplexity protocol against a hand computation on a tiny model, and eval_ppl.py's own
flags (--block-influence, --skip, --inject-distance) end to end on a tiny checkpoint."""
import dataclasses
import math
import shlex

import pytest
import torch
from tiny_checkpoint import char_tokenizer, save_tiny_checkpoint

import bench
import eval_ppl
from bench import importance

DOCS = ["The quick brown fox jumps over the lazy dog.",
        "Perplexity is the exponential of the mean negative log-likelihood.",
        "Short texts, scored one by one."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def _by_hand(model, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """Token by token: token t is predicted from the tokens of the first window that scores it
    (stride = ctx: its own window; with overlap: the first window that reaches past the
    previous windows), with its own forward pass over just that context."""
    total, count, scored_to = 0.0, 0, 0
    begins = list(range(0, len(ids), stride))
    for k, begin in enumerate(begins):
        end = min(begin + ctx, len(ids))
        for t in range(max(begin + 1, scored_to), end):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[begin:t]]), use_cache=False).logits[0, -1]
            total -= torch.log_softmax(logits.double(), dim=-1)[ids[t]].item()
            count += 1
        scored_to = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("ctx, stride", [(16, 16), (16, 5), (16, 1), (7, 7), (200, 200)])
def test_perplexity_by_hand(model_and_tokenizer, ctx, stride):
    model, tokenizer = model_and_tokenizer
    text = "\n\n".join(DOCS[:2])
    ids = tokenizer(text).input_ids[:60]
    nll, n = _by_hand(model, ids, ctx, stride)
    ppl, n_scored = eval_ppl.perplexity(model, tokenizer, DOCS[:2], ctx, stride, max_tokens=60, progress=False)
    assert n_scored == n
    expected_n = 59 if stride < ctx or ctx >= 60 else 60 - math.ceil(60 / ctx)  # a window's first token has no context
    assert n_scored == expected_n
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_separate_texts_pool_their_nll(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    total, count = 0.0, 0
    for doc in DOCS:
        nll, n = _by_hand(model, tokenizer(doc).input_ids, 32, 32)
        total, count = total + nll, count + n
    ppl, n_scored = eval_ppl.perplexity(model, tokenizer, DOCS, 32, 32, max_tokens=None, separate=True, progress=False)
    assert n_scored == count
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    # max_tokens caps the tokens taken over all texts, in order
    _, capped = eval_ppl.perplexity(model, tokenizer, DOCS, 32, 32, max_tokens=50, separate=True, progress=False)
    assert capped == (44 - math.ceil(44 / 32)) + (6 - 1)  # the first text has 44 tokens


def test_windows():
    assert eval_ppl.windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert eval_ppl.windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert eval_ppl.windows(1, 4, 4) == []
    with pytest.raises(ValueError):
        eval_ppl.windows(10, 4, 5)


def test_token_ids_equal_tokenizing_the_whole_text_once():
    tokenizer = char_tokenizer()
    docs = [f"Document {i}: " + "some words " * (i % 7 + 1) for i in range(400)]
    whole = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    for max_tokens in (1, 100, 1000, len(whole) - 1, len(whole), len(whole) + 5, None):
        ids = eval_ppl.token_ids(tokenizer, docs, max_tokens)
        assert torch.equal(ids, whole[:max_tokens] if max_tokens else whole)


def test_token_ids_on_the_embedded_tokenizer():
    """The prefix shortcut on a real BPE tokenizer (SmolLM2's), if its converted checkpoint is
    already cached; nothing is converted or written here."""
    checkpoint = bench.default_cache_dir() / "hf" / "smollm2-135m"
    if not (checkpoint / bench.models._COMPLETE_MARKER).is_file():
        pytest.skip(f"embedded SmolLM2 not converted yet ({checkpoint}); run python run_kvcache.py once")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if not (bench.default_cache_dir() / "embedded" / "wiki.utf8").is_file():
        pytest.skip("the wiki-embedded corpus is not fetched yet")
    docs, _ = bench.load_corpus("wiki-embedded")
    docs = docs[:60]
    whole = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    for max_tokens in (512, 4096, len(whole) - 100):
        assert torch.equal(eval_ppl.token_ids(tokenizer, docs, max_tokens), whole[:max_tokens])


def test_too_few_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(bench.UsageError, match="no token to score"):
        eval_ppl.perplexity(model, tokenizer, ["x"], 8, 8, None, progress=False)


# --------------------------------------------------------------------------- eval_ppl.main

N_LAYERS = 8  # save_tiny_checkpoint's default; --layers even offloads 2 and 4
PPL_TOKENS = 64  # two windows of 32: 64 tokens go in, 62 are scored


@pytest.fixture(scope="module")
def cli_setup(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ppl")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS * 3), encoding="utf-8")
    return root, checkpoint, corpus


def _argv(cli_setup, out, *extra):
    root, checkpoint, corpus = cli_setup
    return ["--model", str(checkpoint), "--quant", "fp32", "--device", "cpu", "--cache-dir", str(root / "cache"),
            "--ppl-dataset", str(corpus), "--ppl-ctx", "32", "--ppl-max-tokens", str(PPL_TOKENS),
            "--out", str(out), *extra]


RUNS = {  # name: eval_ppl flags; each run appends one row to <name>.csv
    "baseline": ("--variant", "baseline", "--block-influence"),
    "even": ("--variant", "kvcache", "--layers", "even"),
    "skip": ("--variant", "kvcache", "--layers", "even", "--skip", "2"),
    "stream": ("--variant", "diskoffload", "--prefetch", "0", "--layers", "even"),
    "stream-skip": ("--variant", "diskoffload", "--prefetch", "0", "--layers", "even", "--skip", "2"),
    "distance": ("--variant", "kvcache", "--layers", "even", "--inject-distance", "2"),
}


@pytest.fixture(scope="module")
def runs(cli_setup):
    """One eval_ppl.main per entry of RUNS; returns ({name: row}, {name: argv}, influence rows)."""
    root = cli_setup[0]
    rows, argvs = {}, {}
    influence_out = root / "results" / "block_influence.csv"
    for name, extra in RUNS.items():
        out = root / "results" / f"{name}.csv"
        argv = _argv(cli_setup, out, *extra)
        if "--block-influence" in extra:
            argv += ["--influence-out", str(influence_out)]
        assert eval_ppl.main(argv) == 0
        [rows[name]] = bench.read_rows(out)
        argvs[name] = argv
    return rows, argvs, bench.read_rows(influence_out)


def test_block_influence_rows(runs):
    rows, argvs, influence = runs
    base = rows["baseline"]
    command = shlex.join(["python", "eval_ppl.py", *argvs["baseline"]])
    assert base["command"] == command and base["variant"] == "baseline"
    assert [int(r["layer"]) for r in influence] == list(range(N_LAYERS))
    for r in influence:
        assert r["command"] == command
        assert (r["model"], r["quant"], r["device"], r["n_layers"]) == (base["model"], "fp32", "cpu", str(N_LAYERS))
        assert (r["ppl"], r["ppl_dataset"], r["ppl_ctx"], r["run_id"]) == (
            base["ppl"], base["ppl_dataset"], "32", base["run_id"])
        assert r["tokens"] == str(PPL_TOKENS)  # every token that goes in, scored or not
        assert 0 < float(r["block_influence"]) < 2
    assert base["ppl_tokens"] == str(PPL_TOKENS - 2)
    assert tuple(influence[0]) == tuple(f.name for f in dataclasses.fields(importance.InfluenceRow))


def test_block_influence_without_the_flag_writes_no_influence_file(cli_setup, tmp_path):
    out, influence_out = tmp_path / "ppl.csv", tmp_path / "bi.csv"
    assert eval_ppl.main(_argv(cli_setup, out, "--influence-out", str(influence_out))) == 0
    assert len(bench.read_rows(out)) == 1 and not influence_out.exists()


@pytest.mark.parametrize("name, skipped, offloaded", [
    ("even", "", "2 4"), ("skip", "2", "2 4"), ("stream", "", "2 4"), ("stream-skip", "2", "2 4"),
])
def test_skip_row(runs, name, skipped, offloaded):
    row = runs[0][name]
    assert (row["skipped_layers"], row["layers"], row["layers_offloaded"], row["alpha"]) == (
        skipped, "even", offloaded, "1")


@pytest.mark.parametrize("full, skip", [("even", "skip"), ("stream", "stream-skip")])
def test_skip_reads_fewer_bytes(runs, full, skip):
    rows = runs[0]
    full_bytes, skip_bytes = int(rows[full]["read_bytes_per_token"]), int(rows[skip]["read_bytes_per_token"])
    assert 0 < skip_bytes < full_bytes
    assert 2 * skip_bytes == full_bytes  # layers 2 and 4 are the same size; only 4 is read
    assert rows[full]["ppl"] == rows["baseline"]["ppl"]  # alpha 1: the same model
    assert rows[skip]["ppl"] != rows["baseline"]["ppl"]  # layer 2 removed


@pytest.mark.parametrize("name, distance", [("baseline", ""), ("even", "1"), ("distance", "2")])
def test_inject_distance_column(runs, name, distance):
    assert runs[0][name]["inject_distance"] == distance


def test_inject_distance_changes_the_model(runs):
    rows = runs[0]
    assert rows["distance"]["ppl"] != rows["even"]["ppl"]  # no longer the exact model at alpha 1


@pytest.mark.parametrize("extra, message", [
    (["--variant", "kvcache", "--block-influence"],
     "--block-influence scores the unpatched model's layers; use --variant baseline"),
    (["--variant", "diskoffload", "--block-influence"], "--block-influence scores the unpatched model's layers"),
    (["--variant", "kvcache", "--layers", "even", "--skip", "3"],
     "--skip: layers 3 are not offloaded (--layers [2, 4])"),
    (["--variant", "kvcache", "--layers", "even", "--skip", "2,3,5"], "--skip: layers 3 5 are not offloaded"),
    (["--variant", "kvcache", "--inject-distance", "0"], "argument --inject-distance: 0 is too small (minimum 1)"),
])
def test_cli_errors(cli_setup, tmp_path, capsys, extra, message):
    out, influence_out = tmp_path / "ppl.csv", tmp_path / "bi.csv"
    with pytest.raises(SystemExit) as exit_:
        eval_ppl.main(_argv(cli_setup, out, "--influence-out", str(influence_out), *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n")
    assert err.splitlines()[-1].startswith(f"eval_ppl.py: error: {message}")
    assert not out.exists() and not influence_out.exists()
