"""The perplexity protocol against a hand computation on a tiny model."""
import math

import pytest
import torch
from tiny_checkpoint import char_tokenizer, save_tiny_checkpoint

import bench
import eval_ppl

DOCS = ["The quick brown fox jumps over the lazy dog.",
        "Perplexity is the exponential of the mean negative log-likelihood.",
        "Short texts, scored one by one."]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


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
