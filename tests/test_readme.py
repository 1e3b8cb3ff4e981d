"""README.md: the ten-minute page stays short, its links into results/README.md land on
headings that exist, its library example runs as written (on a tiny local checkpoint instead
of the embedded model), and its captured quick start still has the lines the main job prints."""
import contextlib
import io
import re
from pathlib import Path

import pytest
from tiny_checkpoint import save_tiny_checkpoint

import bench
import run_kvcache
from reporting import timings
from reporting.tables import anchor, headings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_WORDS = 2700  # as `wc -w README.md` counts them: a ten-minute page
MODEL_LINE = re.compile(r"^model_id = .*$", re.M)  # the one line the test replaces


def library_example(text: str) -> str:
    """The first ```python block after the '## Library example' heading."""
    section = text.split("\n## Library example\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_readme_is_a_ten_minute_page():
    words = len(README.read_text(encoding="utf-8").split())  # wc -w: runs of non-whitespace
    assert words <= MAX_WORDS, f"README.md has {words} words (cap {MAX_WORDS}); move detail to results/README.md"


def test_links_into_the_results_page_land_on_its_headings():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(results/README\.md#([^)]+)\)", text)
    assert targets, "README.md links to no section of results/README.md"
    page = (REPO / "results" / "README.md").read_text(encoding="utf-8")
    anchors = {anchor(h) for h in headings(page)}
    assert sorted(set(targets) - anchors) == []
    # and the page's own contents list
    assert sorted(set(re.findall(r"\]\(#([^)]+)\)", page)) - anchors) == []


def test_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    code = library_example(README.read_text(encoding="utf-8"))
    assert len(MODEL_LINE.findall(code)) == 1, "the example names its model on one line: model_id = ..."
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", n_layers=8)  # with its tokenizer files
    code = MODEL_LINE.sub(f"model_id = {str(checkpoint)!r}", code)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the example's cache_dir is relative
    for name in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__main__"}
    exec(compile(code, "README.md library example", "exec"), namespace)
    out = capsys.readouterr().out
    assert "offloaded [2, 4]" in out and "layer reads" in out
    assert list((work / "offload-cache").glob("*/layer_2.safetensors"))
    model = namespace["model"]
    assert not any(type(layer).__name__ == "OffloadedLayer" for layer in model.model.layers)  # unpatched


# --------------------------------------------------------------------------- the quick start's capture

def line_shape(line: str) -> str:
    """What a printed line is, without what it measured: its indent and its label, the words
    before the first one holding a digit or a path (`  standby weights`, `  row appended to`);
    a line that starts with a number keeps its words, numbers masked (`  N s since ...`)."""
    indent = line[: len(line) - len(line.lstrip())]
    words = line.split()
    label = []
    for word in words:
        if re.search(r"[\d/]", word):
            break
        label.append(word)
    if not label:
        label = ["N" if re.search(r"\d", w) else w for w in words]
    return indent + " ".join(label)


def shapes(text: str) -> list[str]:
    return [line_shape(line) for line in text.splitlines() if line.strip()]


def readme_capture() -> str:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- quickstart:start -->", 1)[1].split("<!-- quickstart:end -->", 1)[0]
    return block.strip().removeprefix("```").removesuffix("```").strip("\n")


def main_job_output(tmp_path, monkeypatch) -> str:
    """What `python run_kvcache.py` prints, on a tiny tied checkpoint in NF4 (the default model is
    tied, the default format NF4): the defaults but for the model, the corpus and the sizes."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", n_layers=8, tied=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The printing press made books cheaper, and reading spread across Europe.\n\n" * 8,
                      encoding="utf-8")
    monkeypatch.setattr(bench.measure, "_cpu_sample", _quiet_machine)  # a busy machine adds a warning line
    argv = ["--model", str(checkpoint), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--ppl-dataset", str(corpus), "--ppl-ctx", "32", "--ppl-max-tokens", "128", "--max-new-tokens", "4",
            "--out", str(tmp_path / "kvcache.csv")]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert run_kvcache.main(argv) == 0
    return out.getvalue()


def _quiet_machine():
    wall, _, own = _real_cpu_sample()
    return wall, own, own


_real_cpu_sample = bench.measure._cpu_sample


@pytest.mark.capture
def test_quickstart_capture_is_current(tmp_path, monkeypatch):
    """THE STALENESS TEST: README's captured quick start (from results/quickstart.txt, by
    `bash reproduce.sh --quickstart`) has the lines the main job prints now, in order, and the
    `runtime:` line the how-long sentence reads. Fails until the capture is made again."""
    captured = (REPO / "results" / timings.QUICKSTART).read_text(encoding="utf-8")
    assert shapes(readme_capture()) == shapes(captured), "README's block differs from results/quickstart.txt: python report.py"
    assert timings.runtime_s(captured) is not None, "results/quickstart.txt has no runtime: line"
    now = shapes(main_job_output(tmp_path, monkeypatch)) + ["runtime:"]
    assert shapes(captured) == now, ("results/quickstart.txt is stale: the main job prints other lines now; "
                                     "run `bash reproduce.sh --quickstart` alone on the machine")
