"""bench.corpus: corpora by name (nothing is downloaded here)."""
import sys

import pytest

import bench
from bench.corpus import WIKI_EMBEDDED


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_wiki_embedded_corpus():
    """On the real file when a run has fetched it into the user's cache (read only, never fetched here)."""
    cache = bench.default_cache_dir()
    path = cache / "embedded" / WIKI_EMBEDDED.name
    if not path.is_file():
        pytest.skip(f"{path} not fetched yet (any run with --ppl-dataset wiki-embedded fetches it)")
    raw = path.read_text(encoding="utf-8")
    docs, label = bench.load_corpus("wiki-embedded", cache)
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


