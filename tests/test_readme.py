"""README.md: the ten-minute page stays short, its links into results/README.md land on
headings that exist, and its library example runs as written (on a tiny local checkpoint
instead of the hub model)."""
import re
from pathlib import Path

from tiny_checkpoint import save_tiny_checkpoint

from reporting.tables import anchor, headings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_LINES = 400
MODEL_LINE = re.compile(r'^model_id = ".*"$', re.M)  # the one line the test replaces


def library_example(text: str) -> str:
    """The first ```python block after the '## Library example' heading."""
    section = text.split("\n## Library example\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_readme_is_a_ten_minute_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail to results/README.md"


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
    assert len(MODEL_LINE.findall(code)) == 1, "the example names its model on one line: model_id = \"...\""
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
