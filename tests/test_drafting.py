"""bench/drafting.py through run_diskoffload.py --draft (issue 20): the row a draft run writes,
what it says about reads and exactness, and the flags' errors."""
import contextlib
import dataclasses
import io

import pytest
from test_scripts import _quiet_machine
from tiny_checkpoint import save_tiny_checkpoint

import bench
import run_diskoffload
from bench.prompts import Prompt

N_NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("drafting") / "tiny")


def _argv(checkpoint, out, *extra):
    return ["--model", str(checkpoint), "--quant", "fp32", "--device", "cpu", "--cache-dir",
            str(checkpoint.parent / "cache"), "--prompt", "Once upon a time", "--max-new-tokens", str(N_NEW),
            "--warmup", "1", "--repeats", "1", "--ppl-max-tokens", "0", "--prefetch", "0", "--out", str(out), *extra]


def _run(argv, monkeypatch) -> str:
    monkeypatch.setattr(bench.measure, "_cpu_sample", _quiet_machine)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert run_diskoffload.main(argv) == 0
    return stdout.getvalue()


@pytest.mark.parametrize("draft", ["lookup", "self", "sibling"])
def test_a_draft_run_writes_one_speculative_row(checkpoint, tmp_path, draft, monkeypatch):
    out = tmp_path / "speculative.csv"
    name = str(checkpoint) if draft == "sibling" else draft  # the checkpoint itself: a perfect draft
    # constant: every verify asks the draft (adaptive decisions follow this machine's timings)
    printed = _run(_argv(checkpoint, out, "--draft", name, "--draft-schedule", "constant"), monkeypatch)
    (row,) = bench.read_rows(out)
    assert list(row) == [f.name for f in dataclasses.fields(bench.SpeculativeRow)]
    assert (row["schedule"], row["plain_steps"]) == ("constant", "0")
    assert row["draft"] == ("self:nf4" if draft == "self" else name)
    assert row["prompt_kind"] == "prompt" and row["prompts"] == "1" and row["new_tokens"] == str(N_NEW)
    assert row["tokens_equal"] == "True" and row["prompts_differing"] == "0" and row["max_diff_gap"] == ""
    forwards, streamed = int(row["verify_forwards"]), int(row["streamed_bytes_per_forward"])
    assert 1 <= forwards <= N_NEW
    assert float(row["read_bytes_per_token"]) == pytest.approx(streamed * forwards / N_NEW, rel=1e-5)  # 6 digits in the CSV
    assert float(row["plain_read_bytes_per_token"]) == streamed
    assert float(row["accepted_per_verify"]) == pytest.approx(N_NEW / forwards, rel=1e-5)
    assert float(row["vs_plain"]) == pytest.approx(float(row["decode_tok_s"]) / float(row["plain_decode_tok_s"]),
                                                   rel=1e-4)
    assert row["command"].startswith("python run_diskoffload.py --model")
    if draft == "sibling":
        assert row["acceptance"] == "1" and forwards < N_NEW and row["draft_quant"] == "fp32"
        assert int(row["draft_bytes"]) > streamed  # a whole model: more than the streamed layers
    if draft == "self":
        assert row["draft_layers"] == "2 4" and row["draft_quant"] == ""
        assert int(row["draft_bytes"]) <= 0.35 * int(row["substituted_bytes"])
    if draft == "lookup":
        assert row["draft_bytes"] == "0"
    assert "equal to plain stream decoding on every prompt" in printed
    assert f"row appended to {out}" in printed


def test_the_default_schedule_is_adaptive_and_counts_its_plain_steps(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "speculative.csv"
    _run(_argv(checkpoint, out, "--draft", str(checkpoint)), monkeypatch)
    (row,) = bench.read_rows(out)
    assert row["schedule"] == "adaptive" and row["tokens_equal"] == "True"
    assert 0 <= int(row["plain_steps"]) < int(row["verify_forwards"])


def test_a_prompt_set_decodes_each_prompt(checkpoint, tmp_path, monkeypatch):
    prompts = [Prompt("code", f"HumanEval/{k}", f"def f{k}(x):\n    return x") for k in range(3)]
    monkeypatch.setattr(bench.drafting, "load_prompts", lambda kind, count, cache_dir: prompts[:count])
    out = tmp_path / "speculative.csv"
    _run(_argv(checkpoint, out, "--draft", "lookup", "--prompts", "code", "--prompt-count", "2"), monkeypatch)
    (row,) = bench.read_rows(out)
    assert (row["prompt_kind"], row["prompts"], row["new_tokens"]) == ("code", "2", str(2 * N_NEW))


def test_draft_rows_go_to_speculative_csv_by_default(checkpoint, monkeypatch):
    args = run_diskoffload.finish(run_diskoffload_parser().parse_args(["--draft", "lookup"]))
    assert args.out == bench.RESULTS_DIR / "speculative.csv"
    args = run_diskoffload.finish(run_diskoffload_parser().parse_args([]))
    assert args.out == bench.RESULTS_DIR / "diskoffload.csv"


def run_diskoffload_parser():
    parser = bench.build_parser("diskoffload", prog="run_diskoffload.py")
    bench.drafting.add_arguments(parser)
    return parser


@pytest.mark.parametrize("extra, message", [
    (["--draft", "self:int3"], "--draft self:int3: unknown substitute; choose from self:nf4, self:hqq3, self:hqq2"),
    (["--draft", "lookup", "--draft-tokens", "0"], "--draft-tokens must be >= 1, got 0"),
    (["--draft", "lookup", "--batch-size", "2"], "--draft decodes one sequence at a time: drop --batch-size"),
    (["--draft", "lookup", "--no-kv-cache"], "--draft verifies from the KV cache: drop --no-kv-cache"),
    (["--draft", "no-such-draft"], "unknown model 'no-such-draft'"),
    (["--draft", "lookup", "--prompts", "poems"], "argument --prompts: invalid choice: 'poems'"),
    (["--draft", "lookup", "--prompt-count", "0"], "--prompt-count must be >= 1, got 0"),
])
def test_draft_flag_errors(checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "x.csv"
    with pytest.raises(SystemExit) as exit_:
        run_diskoffload.main(_argv(checkpoint, out, *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"run_diskoffload.py: error: {message}")
    assert not out.exists()


def test_an_nf4_target_has_no_nf4_self_draft(tmp_path, capsys, monkeypatch):
    from conftest import force_nf4_path
    quant = force_nf4_path("nf4-dequant", monkeypatch)
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    argv = _argv(checkpoint, tmp_path / "x.csv", "--draft", "self")
    argv[argv.index("fp32")] = quant
    with pytest.raises(SystemExit):
        run_diskoffload.main(argv)
    assert "--draft self:nf4: an nf4 substitute needs a bf16/fp16/fp32 target" in capsys.readouterr().err
