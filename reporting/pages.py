"""The command line behind `python report.py`, and the two pages it writes: results/README.md,
generated whole (its layout and prose are here, its tables and figures come from the block
modules), and README.md, whose marker blocks (<!-- name:start --> ... <!-- name:end -->) are
filled with headline blocks that link into results/README.md. Plots go to results/*.png."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench
import estimate
import sweep
from reporting import beyond, fit, headline, load, runs, speculative, streaming, study, timings
from reporting.tables import anchor, marker, replace_block

USAGE = """Render results/*.csv: results/README.md (every table, generated whole), README.md's
headline blocks (between their markers) and the plots results/*.png.

    python report.py                      # results/README.md, README.md, results/*.png
    python report.py --columns            # what each CSV column counts
"""
QUICKSTART = "results/" + timings.QUICKSTART  # the main job's captured stdout, shown in README.md's quick start

# results/README.md's sections, in order: (key, heading level, title). The key names the
# section's body below; README.md's headline blocks link to these titles' anchors.
SECTIONS = (
    ("protocol", 2, "How the rows are measured"),
    ("lead", 2, "Qwen2.5-Coder-1.5B beside the original"),
    ("results", 2, "Every row, per machine kind"),
    ("exactness", 2, "Exactness on a real model"),
    ("nf4-cpu", 2, "NF4 on a CPU"),
    ("study", 2, "Findings: the study"),
    ("alpha", 3, "How far can alpha move from 1?"),
    ("importance", 3, "Which layers matter? Removal perplexity against Block Influence"),
    ("planner", 3, "The planner: skip the least important, stream the rest"),
    ("patterns", 3, "Which layers, and in parallel?"),
    ("distance", 3, "Injecting later: inject_distance"),
    ("context", 3, "Longer contexts"),
    ("streaming", 2, "Streaming: the bandwidth model"),
    ("peers", 2, "Streaming against its peers: accelerate disk offload and AirLLM"),
    ("cold", 2, "Cold reads: the bytes come from the disk"),
    ("cpu-read", 2, "Mapped or copied: a streamed layer on a CPU"),
    ("batch", 2, "Batches: one read serves every sequence"),
    ("speculative", 2, "Speculative decoding: one read of the streamed layers for several tokens"),
    ("profile", 2, "A decode step, op by op"),
    ("load", 2, "Models larger than the device: the load peak"),
    ("large", 2, "Larger than the device: 7B and 14B shapes within 6 GiB"),
    ("fit", 2, "Fit to a device: the plan against a search"),
    ("beyond", 2, "Beyond the layers: embedding rows from disk, an NF4 head"),
)
TITLES = {key: title for key, _, title in SECTIONS}
RESULTS_PAGE = "results/README.md"


def link(key: str) -> str:
    """README.md's link to a section of results/README.md."""
    return f"{RESULTS_PAGE}#{anchor(TITLES[key])}"


# --------------------------------------------------------------------------- prose

FIT = """`--device-budget SIZE` (`offload_skip.plan`) chooses from exact levers only: which layers stream
(any set: a run of adjacent offloaded layers computes in sequence, `runs="sequential"`, so alpha = 1 is the
original model), the read-ahead depth, copy or map on a CPU, and the input embedding's rows from disk. It
weighs, for each depth and read and for three placements (interleaved, first-fit, last), the fewest streamed
layers that fit, timing each by replaying the stream reader (`stream_step_s`) with rates a short probe measured
on this machine and cached (`bench/planning.py`). A mapped CPU layer stays mapped until standby and the
controller counts it, so a plan that streams anything copies. Each case below times the plan beside a grid of
hand configurations and today's defaults at that budget (`--layers even`, the even layers kept first-fit under
what is left, `--prefetch auto`; with `--cpu-read map`, the default, and with copy)."""

FIT_CARD = """On a 6 GB card (`python estimate.py --plan`): the same planner with the card's rates stated
instead of probed ones (a prediction; no GPU has run it)."""
# The prose of results/README.md holds no measured number: those come with the blocks.

PROTOCOL = """\
- **Speed.** Greedy decoding of `--max-new-tokens` tokens from a fixed prompt through one decode
  loop shared by every variant (prefill, then one token at a time from the KV cache;
  `--no-kv-cache` recomputes the whole sequence per token, the original's slow variant).
  `--warmup` untimed runs, then the median of `--repeats`; the device is synchronised around the
  timers; prefill and decode are timed apart: `decode_tok_s` = (tokens after the first) / decode
  seconds. The baseline and the session variant are also timed through `model.generate`
  (`generate_tok_s`), so that ratios compare like with like: the original's two figures came from
  two different decode paths.
- **Same-run ratios.** A variant script loads the model (its offloaded layers stored one at a
  time), patches it, measures the unpatched model's memory inside `ctl.unpatched()`
  (`baseline_standby_bytes`, `baseline_rss_bytes`), and times each repeat of the variant right
  after one of the unpatched model. The row records both medians and their ratios
  (`decode_ratio`, `generate_ratio`) under its own `run_id`. No ratio anywhere uses another row,
  so rows added later, on this machine or another, never change a published ratio.
- **Perplexity.** The documents joined with blank lines, tokenized once, the first
  `--ppl-max-tokens` tokens, windows of `--ppl-ctx` tokens moving by `--ppl-stride` (= ctx:
  non-overlapping, as GPTQ/AWQ/SLEB); with overlap only the new tokens are scored. PPL =
  exp(mean NLL over the scored tokens). `wiki-embedded` is real Wikipedia text shipped in the
  `exllamav2` wheel, the offline default; `wikitext2` (through `datasets`) is the default for hub
  models; `--ppl-dataset short` scores a few short sentences each on its own, the original's kind
  of figure.
- **Memory.** `ctl.resident_bytes()` counts the distinct storages on the compute device: the
  model's parameters, buffers and NF4 quant-state tensors, plus the offloaded layers' buffers that
  exist at that moment. `standby_bytes` is that value when idle; `peak_bytes` the most seen
  during the measured inference; `rss_bytes` the process RSS when idle, after `malloc_trim(0)`.
  On CUDA the allocator's `cuda_*_bytes` too (reserved: what runs a small card out of memory).
  `load_peak_bytes` is the most on the device while loading. On CUDA, `forward_s` and the copies
  in `load_s` are timed with CUDA events. `python report.py --columns` lists every column.
- **Other load.** Around the timed runs a row records the load average and `other_cpu_share`: the
  share of all cores' time spent outside this process (hypervisor steal counts as other). Above
  the threshold (`bench.BUSY_OTHER_CPU_SHARE`) the row is `busy` and the speed tables leave it out.
- **Machines.** Speed differs between CPU types, and NF4 perplexity differs with the CPU's
  kernels (bitsandbytes computes NF4 differently with AVX512-BF16). So every row records
  `device_name` and `cpu_isa`, tables are per machine kind, a perplexity is compared only with a
  baseline of the same machine kind and library versions, and exactness is stated per machine
  kind. Every row also records the library versions, torch's thread count and the commit
  (`-dirty` if tracked code differed); `reproduce.sh` lists the commands behind this folder.
- **GPU.** No GPU was available to this project: every row here is a CPU row. The CUDA paths
  (pinned staging, copy stream, events) are exercised with `--device cuda`; `bash gpu_check.sh`
  lists what to run and send back."""

LEAD = """\
The original experiment ran Qwen2.5-3B NF4 on an RTX 4050 laptop GPU; the closest
architecture that ships as real weights here is Qwen2.5-Coder-1.5B (Qwen2), with the same
default choice of layers: the even layers of the band."""

NF4_CPU = """\
bitsandbytes has two CPU paths for NF4. On a CPU with AVX512-BF16 it repacks the weights and runs
a fused 4-bit kernel (this repo applies the same repacking before storing a layer, so a reload is
a plain copy); at import it first asks the Hugging Face hub for that kernel through the `kernels`
package and, offline, logs "Failed to load CPU gemm_4bit_forward from kernels-community" and uses
the same kernel built into its own library (the harness drops that message). Without
AVX512-BF16 (the `avx2` machine kind) there is no fused kernel: every forward dequantises every
4-bit weight to bf16 and multiplies in bf16, which a CPU without native bf16 does slowly, the
opposite of a GPU. The unpatched rows of a model in both formats show the gap:"""

STUDY = """\
The study's questions, answered by `sweep.py` (`python sweep.py <suite>`; `--dry-run` prints one
command per case, for a job array or GNU parallel). Each case is one process and one row of
`results/<suite>.csv`, whose `command` column reproduces it. The sweeps run the models in
**fp32**: exact and fast on a CPU without a fused NF4 kernel (see "NF4 on a CPU"); alpha = 1 is
exact in every format (`check_exact.py`), and the questions here are about the layers, not the
quantisation. Each table's source line gives the tokens scored per model: small samples, so read
a difference of a few percent as noise; the effects below are factors."""

STREAMING = """\
In `stream` mode an offloaded layer is brought in just before it is computed and released right
after, so the peak stays at standby plus the layers in flight. On a GPU (and on a CPU with
`--cpu-read copy`) it is read into one of `prefetch + 1` reusable slots, a background thread
reading `prefetch` layers ahead in forward order, wrapping around to the next token's first
layers; a failed read re-raises the named `CacheError` in the caller, and `standby()` waits for
reads in flight. On a CPU by default (`--cpu-read map`) its tensors are views of a private
mapping of its file, kept until `standby()`: no copy, the pages arrive as page faults inside the
first forward, `--prefetch N` passes the next N layers to the kernel as read-ahead advice instead
of reading them, and the mapped pages are file-backed, so the kernel may drop them under memory
pressure (the counted peak still holds them). Layers that fit `--budget` stay resident (or mapped) instead. `--io-bandwidth` throttles
reads to emulate slower storage (copy path only). `ctl.stats()` reports `loads`, `loaded_bytes`,
`load_s` (reading, or mapping and binding), `wait_s` (compute stalled waiting for a layer),
`forward_s` and `overlap` (the share of the smaller of read and compute time that was hidden).
On a CPU a reader thread competes with torch's compute threads for the cores, so the CPU default
is `--prefetch 0`.

The bandwidth model (`estimate.py`): batch-1 decoding reads every weight once per token; without
read-ahead, streaming adds the read (and on a GPU the host-to-device copy) to the compute time;
with read-ahead, reader, copy engine and compute form a pipeline and the slowest stage sets the
pace. Compute time per token is a measured input. For the original setup:"""

STREAMING_CHECK = """\
Checked against the measured stream rows (t_compute: the row's own unpatched model, timed
interleaved in the same process; read time: the row's throttle, or its own measured page-cache
read time; busy rows left out). The model ignores what a reader thread costs the compute threads
on a small CPU, which is what rows with read-ahead and fast reads show."""

PEERS = """\
`run_peers.py` times, in interleaved rounds of one process: the resident model; our stream mode;
accelerate's disk offload (`device_map` "disk", reading the layers from the checkpoint's own
safetensors file); AirLLM when installed (`pip install airllm`). Same layers off the device for
ours and accelerate's."""

COLD = """\
`--cold` drops each layer file from the page cache (posix_fadvise DONTNEED) before reading it, so
the bytes come from the disk. Each row measures its own storage read rate first; the prediction
uses it."""

CPU_READ = """\
On a CPU the "device" is host memory and a layer file read from the page cache is a copy of
bytes already in memory. With `--cpu-read map` (the default on a CPU) a streamed layer's tensors
are views of a private mapping of its file instead, kept until `standby()`: no copy, the kernel
pages the file in on first touch (`--prefetch N` advises it to read the next layers ahead), and
the process's anonymous memory does not grow while generating; the mapped pages are file-backed
and counted in the peak. On CUDA nothing changes: a GPU needs the copy."""

BATCH = """\
`--batch-size N` decodes N left-padded prompts of unequal length: one read of a layer serves every
sequence of the batch."""

SPECULATIVE = """\
Stream residency reads every streamed layer once per target forward; plain decoding runs one
forward per token. `run_diskoffload.py --draft KIND` (speculative.py) lets a draft propose up to
20 tokens (transformers' number: a model draft stops early where its top probability falls below 0.4;
`--draft-tokens N` caps it), the
target verifies them in one forward and keeps the agreeing prefix plus its own next token, so one
read serves every accepted token and the output is the target's greedy output. Drafts: a sibling
model with the same tokenizer, resident; `self:nf4|hqq3|hqq2`, the target itself with a resident
low-bit substitute for each streamed layer (built once from the layer files and stored like them),
sharing every resident module (SubSpec's idea, arXiv 2509.18344); `lookup`, prompt lookup. No
draft reads a streamed layer. On this CPU a draft computes on the target's cores, so a draft can
cost more than its accepted tokens save: the default `--draft-schedule adaptive` asks the draft
only while the run's own timings say drafting is faster than plain steps (a draft whose token
takes as long as a plain step is never asked again; a losing one waits, longer each time; a new
prompt is read by the draft only if the tokens left repay it); a run keeps one schedule across
its warm-up and prompts, so its rows show what the schedule settled on (a one-off run also pays
its first tries); `constant` asks at every verify, as transformers does, and shows what each
draft does when used. Exactness: a verify forward over several positions sums in another order than
one-token forwards, so in bf16/NF4 a token may flip where the target's top two logits nearly tie;
every row says whether its tokens equal plain stream decoding's, and where not, how near the tie
was. Cold rows read with `--cpu-read copy`: every forward's reads come from the disk (a mapping
would keep the pages for the whole decode); with read-ahead the reader keeps fetching the next
verify's first layers while the draft proposes."""

SPECULATIVE_BEST = """\
The best draft per target, reads and prompt kind (at the default schedule where it was measured), beside the
slowest draft of the same case; every row follows."""

SPECULATIVE_ESTIMATE = """What the acceptance measured here predicts on a GPU (`python estimate.py --speculative results`):
time per token = (drafted tokens x t_draft + t_verify) / tokens per verify, the streamed bytes read
once per verify; every assumption is named in estimate.py."""

PROFILE = """\
What a decode step spends, op by op, resident against stream (`profile_step.py`: torch.profiler
over alternating decodes)."""

LOAD = """\
A patched variant loads through `bench/layer_loading.py`: each offloaded layer in turn is made
real on the run device (NF4 quantised there, so the stored bytes are the computed bytes), written
to its layer file and emptied; then `from_pretrained` loads the rest. The device holds one
offloaded layer at most. Session residency still brings every offloaded layer back for the whole
inference, so a model larger than the device generates with stream residency."""

BEYOND = """\
Offloading decoder layers saves only the layers' share; on small and mid-size models the
vocabulary matrices are much of the rest. `--offload-embeddings` reads the input embedding's rows
of a forward's tokens from a file (exact; a tied embedding stays resident: the head needs the
whole matrix every forward). `--quant-head nf4` replaces the output head by a bitsandbytes NF4 copy:
**this changes the model**, and the table gives its perplexity cost. The steps, per model (NF4
body): unpatched; the even layers offloaded (session); + the embedding's rows from disk; + the NF4
head; all of it streamed."""

PLOTS = {"results": ("memory.png", "speed.png"), "alpha": ("study_alpha.png",), "importance": ("study_importance.png",),
         "planner": ("study_planner.png",), "patterns": ("study_patterns.png",), "context": ("study_context.png",),
         "peers": ("peers.png",), "cold": ("cold.png",), "batch": ("batch.png",), "speculative": ("speculative.png",),
         "beyond": ("beyond.png",)}


# --------------------------------------------------------------------------- blocks

def blocks(results: Path) -> dict[str, str]:
    """Every full block name -> its markdown, from the CSVs in `results` (also the names a
    markdown file may hold markers for)."""
    rows = runs.load_rows(results)
    return {
        "results": runs.render(rows, results.name),
        "lead": runs.lead_section(rows),
        "exactness": runs.exactness_section(exactness_rows(results), results.name),
        "estimate-reference": estimate.reference_table(),
        "estimate-check": estimate.check_table(results),
        "speculative": speculative.section(results),
        "estimate-speculative": estimate.speculative_table(results),
        **study.sections(results),
        **streaming.sections(results),
        **beyond.sections(results),
        **load.sections(results),
        "fit": fit.section(results),
    }


def exactness_rows(results: Path) -> list[dict]:
    return [{"device_name": "", "cpu_isa": "", **r} for r in bench.read_rows(results / "exactness.csv")]


def headline_blocks(results: Path) -> dict[str, str]:
    """README.md's blocks: each a few lines linking to its full section in results/README.md."""
    rows = runs.load_rows(results)
    suites = ("alpha", "importance", "planner", "patterns", "distance", "context")
    return {
        "headline-original": headline.original(rows, link("lead")),
        "headline-exactness": headline.exactness(exactness_rows(results), link("exactness")),
        "headline-streaming": headline.streaming_memory(rows, link("results")),
        "headline-peers": headline.peers(results, link("peers")),
        "headline-cpu-read": headline.cpu_read(results, link("cpu-read")),
        "headline-speculative": headline.speculative_decoding(results, link("speculative")),
        "headline-study": headline.study_answers(results, {s: link(s) for s in suites}, TITLES),
        "headline-load": headline.load_peaks(results, link("load")),
        "headline-large": headline.large_shapes(results, link("large")),
        "headline-beyond": headline.beyond_levers(results, link("beyond")),
        "headline-fit": headline.fit_plan(results, link("fit")),
    }


def _bullets(sentences: list[str]) -> str:
    return "\n".join(f"- {s}" for s in sentences)


def results_page(results: Path) -> str:
    """results/README.md, whole."""
    named = blocks(results)
    rows = runs.load_rows(results)
    answers = study.answers(results)
    body = {
        "protocol": PROTOCOL,
        "lead": LEAD + "\n\n" + named["lead"] + "\n\n" + _bullets(runs.lead_answers(rows, results)),
        "results": named["results"],
        "exactness": named["exactness"],
        "nf4-cpu": NF4_CPU + "\n\n" + (_bullets(runs.nf4_cpu_answers(rows)) or "(no pair of bf16 and NF4 baseline rows)"),
        "study": STUDY,
        "streaming": STREAMING + "\n\n" + named["estimate-reference"] + "\n\n" + STREAMING_CHECK + "\n\n"
                     + named["estimate-check"],
        "peers": PEERS + "\n\n" + _bullets(streaming.peers_answers(results)) + "\n\n" + named["peers"],
        "cold": COLD + "\n\n" + _bullets(streaming.cold_answers(results)) + "\n\n" + named["cold"],
        "cpu-read": CPU_READ + "\n\n" + _bullets(streaming.cpu_read_answers(results)) + "\n\n" + named["cpu-read"],
        "batch": BATCH + "\n\n" + _bullets(streaming.batch_answers(results)) + "\n\n" + named["batch"],
        "speculative": "\n\n".join(part for part in (
            SPECULATIVE, _bullets(speculative.answers(results)), SPECULATIVE_BEST, speculative.best_table(results),
            named["speculative"], SPECULATIVE_ESTIMATE, speculative.gpu_prediction(results),
            named["estimate-speculative"]) if part),
        "profile": PROFILE + "\n\n" + _bullets(streaming.profile_answers(results)) + "\n\n" + named["profile"],
        "load": LOAD + "\n\n" + named["load"],
        "large": named["large"],
        "fit": FIT + "\n\n" + named["fit"] + "\n\n" + FIT_CARD + "\n\n```\n" + estimate.plan_table() + "\n```",
        "beyond": BEYOND + "\n\n" + named["beyond"],
    }
    for suite in ("alpha", "importance", "planner", "patterns", "distance", "context"):
        sentences = answers.get(suite, (None, []))[1]
        body[suite] = (_bullets(sentences) + "\n\n" if sentences else "") + named[f"findings-{suite}"]
    out = ["# Results",
           "",
           "Generated by `python report.py` from the CSVs in this folder: do not edit it by hand (change "
           "`reporting/` and run `python report.py` again). Every number on this page is a row of a CSV here, or "
           "computed from rows; each row records its command, commit and machine. The project's page is "
           "[../README.md](../README.md).",
           "",
           "Contents:",
           ""]
    out += [f"{'  ' * (level - 2)}- [{title}](#{anchor(title)})" for _, level, title in SECTIONS]
    for key, level, title in SECTIONS:
        out += ["", "#" * level + " " + title, "", body[key].strip()]
        pictures = [name for name in PLOTS.get(key, ()) if (results / name).is_file()]
        if pictures:  # links relative to this folder
            out += ["", " ".join(f"![{Path(name).stem}]({name})" for name in pictures)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- files

def fill(path: Path, named: dict[str, str]) -> list[str]:
    """Replace each named marker block present in the file; the names filled (the file is
    written only if its text changed, so a second run leaves it untouched)."""
    if not path.is_file():
        return []
    text = original = path.read_text(encoding="utf-8")
    filled = []
    for name, block in named.items():
        new = replace_block(text, name, block)
        if new is not None:
            text = new
            filled.append(name)
    if text != original:
        path.write_text(text, encoding="utf-8")
    return filled


def write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="report.py", description=USAGE.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=bench.RESULTS_DIR,
                        help="directory whose *.csv are read; the PNGs are written there too")
    parser.add_argument("--readme", type=Path, default=bench.REPO_DIR / "README.md",
                        help="markdown file whose marker blocks (<!-- name:start --> ... <!-- name:end -->) are replaced")
    parser.add_argument("--results-readme", type=Path, default=None,
                        help="the generated results page (default: <results>/README.md)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--columns", action="store_true", help="print what each CSV column counts and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.columns:
        docs = bench.column_docs(bench.Result)
        width = max(map(len, docs))
        for name, doc in docs.items():
            print(f"{name:<{width}}  {doc}")
        return 0
    results = args.results
    for out, added in sweep.merge_results(results):  # rows sweep cases left in results/<suite>.d
        print(f"{out}: {added} row(s) merged from {bench.row_dir(out)}")
    if not args.no_plots:  # first, so that the results page links the figures it finds
        for path in (runs.plot(runs.load_rows(results), results) + study.plots(results) + streaming.plots(results)
                     + beyond.plots(results) + speculative.plot(results)):
            print(f"wrote {path}")
    page = args.results_readme or results / "README.md"
    print(f"{page}: " + ("written" if write_if_changed(page, results_page(results)) else "unchanged"))

    named = {**blocks(results), **headline_blocks(results)}
    named["timings"] = timings.how_long(results)
    quickstart = timings.quickstart_block(results)
    if quickstart is not None:
        named["quickstart"] = quickstart
    device_budget = timings.device_budget_block(results)
    if device_budget is not None:
        named["device-budget"] = device_budget
    before = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else None
    filled = fill(args.readme, named)
    if filled:
        changed = args.readme.read_text(encoding="utf-8") != before
        print(f"{args.readme}: {'updated' if changed else 'unchanged'} ({len(filled)} blocks: {', '.join(filled)})")
    text = args.readme.read_text(encoding="utf-8") if args.readme.is_file() else ""
    if quickstart is None and marker("quickstart") in text:
        print(f"{args.readme}: quick-start block left as it is: no {results / Path(QUICKSTART).name} (the main "
              "job's captured stdout) yet", file=sys.stderr)
    if not filled:
        print(named["results"])
        print(f"\n{args.readme} has no {marker('results')} ... {marker('results', end=True)} markers nor any other "
              "report block (or does not exist): table printed above, README untouched", file=sys.stderr)
    return 0
