"""The result row's schema: ``csv_row`` (a frozen dataclass for one CSV row, the environment
columns appended), ``Result`` (a run's row) and ``column_docs``, each column's meaning read
from the comment on its field. Nothing here knows a file or a run: bench.csvio writes and
reads the rows, bench.rows fills a Result from a run."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from dataclasses import dataclass

from .provenance import ENVIRONMENT_FIELDS, Environment

# Other work above this share of the machine marks a row busy (README tables leave it out).
# An idle VM here shows ~0.01; a second benchmark or a test run on 2 cores 0.3-0.5.
BUSY_OTHER_CPU_SHARE = 0.10


def csv_row(cls):
    """A frozen dataclass for one CSV row: the class's own fields, then the environment columns."""
    cls.__annotations__ = {**cls.__dict__.get("__annotations__", {}),
                           **{name: kind.__name__ for name, kind in ENVIRONMENT_FIELDS.items()}}
    return dataclass(frozen=True)(cls)


def column_docs(row_type: type) -> dict[str, str]:
    """What each documented column of `row_type` (a csv_row class) means, in column order: the
    comment after its field in the class's source, continued on the comment lines below it
    that are indented deeper than the field; the environment columns' from Environment. A
    column without a comment is left out."""
    own, shared = field_comments(row_type), field_comments(Environment)
    docs = {}
    for f in dataclasses.fields(row_type):
        doc = own.get(f.name) or (shared.get(f.name) if f.name in ENVIRONMENT_FIELDS else None)
        if doc:
            docs[f.name] = doc
    return docs


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment, for the annotated fields of `cls`'s own class body."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: (tok.start[1], tok.string[1:].strip())  # line -> (column, text)
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or node.end_lineno not in comments:
            continue
        line, parts = node.end_lineno, [comments[node.end_lineno][1]]
        # lines are 1-based: lines[line] is the line after `line`
        while (line + 1 in comments and lines[line].lstrip().startswith("#")
               and comments[line + 1][0] > node.col_offset):
            line += 1
            parts.append(comments[line][1])
        found[node.target.id] = " ".join(parts)
    return found


@csv_row
class Result:
    """One CSV row; the columns are these fields in this order, each documented by its comment
    (column_docs). None is an empty cell: a column that does not apply to this run."""
    # what ran
    variant: str  # baseline (unpatched), kvcache (session residency) or diskoffload (stream residency)
    model: str  # --model as given (embedded alias, directory, hub id, or dummy:SHAPE|ALIAS|DIR)
    weights: str | None  # real, or dummy (seeded random values in the model's shapes and formats: bytes and speed are
        # the real model's, perplexity and acceptance mean nothing, so none is measured); empty in rows written before
        # this column, all of them real
    quant: str  # weight format: nf4 (bitsandbytes, double quant, bf16 compute), bf16, fp16, fp32
    quant_head: str  # output head format: none (as loaded; bitsandbytes leaves the head unquantised) or nf4
        # (--quant-head: a 4-bit copy, approximate by design)
    device: str  # compute device (cpu, cuda)
    device_name: str  # CUDA device name, or 'CPU: <model name>'
    layers: str  # --layers pattern (empty for the baseline)
    layers_offloaded: str  # indices of the offloaded decoder layers, space-separated (empty for the baseline)
    n_layers: int  # decoder layers in the model
    alpha: float | None  # residual weight of the offloaded layers (empty for the baseline); --skip layers have 0
    skipped_layers: str  # offloaded layers removed outright (--skip: alpha 0, never read), space-separated
    inject_distance: int | None  # an offloaded run's contribution is added before the k-th resident layer after it (1:
        # the next one, exact at alpha 1); empty for the baseline
    embedding_residency: str  # input embedding: resident; disk (--offload-embeddings: each forward reads its tokens'
        # rows from a file); tied (asked, but kept resident: the output head shares the matrix)
    tied_embeddings: bool | None  # True when the checkpoint's output head shares the input embedding's matrix (before
        # --quant-head)
    mode: str  # residency: resident (baseline), session (loaded for each inference), stream (loaded per layer use)
    cpu_read: str | None  # patched variants on a CPU, how an offloaded layer came in (--cpu-read): map (its tensors
        # were views of a private mapping of the layer file: no copy, the pages the page cache's) or copy (read into a
        # buffer of the layer's size); empty for the baseline and on CUDA (copied through pinned staging). Rows written
        # before this column (empty after bench.migrate_csv) copied
    prefetch: int | None  # stream: layers read ahead by the background reader (resolved from auto)
    budget_bytes: int | None  # stream: bytes of offloaded layers allowed to stay resident
    io_bandwidth: int | None  # stream: emulated storage bandwidth in bytes/s (empty: unthrottled)
    device_budget_bytes: int | None  # --device-budget: the device bytes the plan fitted the run to (weights at the
        # peak plus the KV cache reserved for the run's context); empty without a plan
    plan: str | None  # --device-budget: the plan's choices (offload_skip.Plan.record: streamed layers, placement,
        # read-ahead, cpu_read, embedding); every layer has a file, the others kept from first use to standby
    predicted_decode_tok_s: float | None  # --device-budget: the plan's predicted decode speed, from the probed rates
    predicted_peak_bytes: int | None  # --device-budget: the plan's predicted peak weights, counted as peak_bytes is
    cold_reads: bool | None  # stream: True when every layer read first dropped the file from the page cache (--cold),
        # so its bytes came from the storage device
    cold_read_bytes_s: float | None  # stream --cold: bytes/s of reading each streamed layer file once, cold, one after
        # the other, measured before the timed runs
    kv_cache: bool | None  # True: decode from the KV cache; False: recompute the whole sequence per token; empty:
        # nothing decoded (eval_ppl.py)
    max_new_tokens: int | None  # tokens decoded per timed run
    batch_size: int | None  # sequences decoded together (left-padded prompts of unequal length); tok/s counts all of
        # them
    prompt_tokens: int | None  # tokens in the prompt
    warmup: int | None  # untimed runs before the measured ones
    repeats: int | None  # measured runs (timings are their median)
    seed: int  # --seed
    command: str  # the command line that wrote the row (python <script> <arguments>): rerun it to reproduce
    run_id: str  # unique id of the script invocation that wrote the row; its baseline_* columns come from the same
        # process

    # memory
    standby_bytes: int  # weight bytes resident on the compute device while idle (parameters, buffers, NF4 quant states;
        # each storage once); variants: after standby()
    peak_bytes: int | None  # most weight bytes resident on the device during the measured runs (controller accounting,
        # stream slots included); baseline: = standby_bytes
    embedding_bytes: int | None  # of standby_bytes: the input embedding (0 when its rows are read from disk; a tied
        # head's matrix is counted here)
    head_bytes: int | None  # of standby_bytes: the output head's own tensors (0 when tied to the embedding)
    resident_layers_bytes: int | None  # of standby_bytes: the decoder layers kept in the model
    other_bytes: int | None  # of standby_bytes: everything else (final norm, rotary tables); the four parts sum to
        # standby_bytes
    offloaded_buffer_bytes: int | None  # peak_bytes - standby_bytes: the offloaded layers' device buffers at the peak
        # (0 for the baseline)
    load_peak_bytes: int | None  # most bytes on the compute device while loading (from_pretrained, then patching):
        # CUDA: torch.cuda.max_memory_allocated; CPU: the weights as standby_bytes counts them, after from_pretrained
        # and after each offloaded layer was made real. Patched variants load the offloaded layers one at a time from
        # the checkpoint (bench/layer_loading.py)
    load_peak_host_bytes: int | None  # most anonymous resident host memory of the process while loading (load_model:
        # from_pretrained, and storing the offloaded layers), sampled every 2 ms from /proc/self/statm (resident -
        # shared: the mmap'd checkpoint is not counted); measured, not counted (CPU: the weights, torch and Python;
        # Linux only)
    rss_bytes: int | None  # process resident set size while idle, after malloc_trim (CPU: everything, weights included;
        # CUDA: host memory and the CUDA context's host side; the pinned staging is released when idle, so it shows in
        # neither this nor baseline_rss_bytes)
    rss_anon_bytes: int | None  # of rss_bytes: anonymous pages (/proc/self/status RssAnon, read just after it): what
        # the process allocated, weights and layer buffers included; Linux only
    rss_file_bytes: int | None  # of rss_bytes: file-backed pages (RssFile): shared libraries and any file still mapped
        # (idle, the layer files are unmapped); clean pages the kernel may drop and read again; Linux only. rss_bytes is
        # about these two plus shared memory (RssShmem)
    peak_rss_anon_bytes: int | None  # the most anonymous resident bytes (RssAnon) of the process while it decodes:
        # sampled every 2 ms over one untimed decode after the timed ones (a copied layer's slot shows here, a mapped
        # layer's file-backed pages do not); Linux only
    cuda_allocated_bytes: int | None  # CUDA only: torch.cuda.memory_allocated while idle
    cuda_max_allocated_bytes: int | None  # CUDA only: torch.cuda.max_memory_allocated over the measured runs (weights,
        # activations, KV cache)
    cuda_reserved_bytes: int | None  # CUDA only: torch.cuda.memory_reserved while idle, after empty_cache
    cuda_max_reserved_bytes: int | None  # CUDA only: torch.cuda.max_memory_reserved over the measured runs (the
        # allocator's cache too: what runs a small card out of memory, with the CUDA context); a variant timed beside
        # the unpatched model: over one more untimed run after empty_cache, since the timed ones inherit the unpatched
        # run's cache
    baseline_standby_bytes: int | None  # variants: standby_bytes of the unpatched model, measured in the same process
        # inside ctl.unpatched() (every offloaded layer read back and in place; rows before the streamed load: before
        # patching)
    baseline_rss_bytes: int | None  # variants: rss_bytes of the unpatched model, same process, measured likewise
    baseline_rss_anon_bytes: int | None  # variants: rss_anon_bytes of the unpatched model, same process, measured
        # likewise (its offloaded layers read into buffers of their own, whatever cpu_read says)
    read_bytes_per_token: int | None  # bytes of layer files one forward reads in stream residency: the offloaded layers
        # not skipped and not kept by --budget (session: the same layers, read once per inference); what decode time
        # follows on a GPU; empty for the baseline

    # quality
    ppl: float | None  # perplexity exp(mean NLL over scored tokens); empty with --ppl-max-tokens 0
    ppl_dataset: str | None  # corpus: wiki-embedded, wikitext2, short (texts scored one by one) or a file path
    ppl_ctx: int | None  # tokens per perplexity window
    ppl_stride: int | None  # tokens the window moves by (= ctx: non-overlapping)
    ppl_tokens: int | None  # tokens scored (predicted) in total

    # speed
    prefill_s: float | None  # median seconds from the start of an inference to its first new token (a session's layer
        # loads included)
    decode_tok_s: float | None  # median batch_size * (max_new_tokens - 1) / seconds from the first to the last new
        # token, greedy, through the shared decode loop
    decode_ms_per_tok: float | None  # milliseconds per decode step (one token of every sequence): 1000 * batch_size /
        # decode_tok_s
    generate_tok_s: float | None  # batch_size * max_new_tokens / median wall seconds of model.generate (greedy, KV
        # cache); baseline and kvcache only
    baseline_decode_tok_s: float | None  # variants: decode_tok_s of the unpatched model (KV cache on), its repeats
        # interleaved with the variant's in the same process
    baseline_generate_tok_s: float | None  # variants: generate_tok_s of the unpatched model, interleaved likewise
    decode_ratio: float | None  # decode_tok_s / baseline_decode_tok_s: the same-run speed ratio
    paired_ratio_median: float | None  # median over the repeats of each pair's ratio (the unpatched decode's seconds
        # over the variant's, timed back to back): steadier than decode_ratio against a machine's drift
    paired_ratio_q1: float | None  # first quartile of those per-pair ratios: with paired_ratio_q3, their spread
    paired_ratio_q3: float | None  # third quartile of those per-pair ratios
    generate_ratio: float | None  # generate_tok_s / baseline_generate_tok_s
    load_1m_before: float | None  # 1-minute load average when the timed runs began (this process's threads included)
    load_1m_after: float | None  # 1-minute load average when they ended
    other_cpu_share: float | None  # share of all cores' time used by other processes (and hypervisor steal) during the
        # timed runs, from /proc/stat minus this process's CPU time
    # busy's 0.1 is BUSY_OTHER_CPU_SHARE (a comment cannot interpolate it; a test checks the two agree)
    busy: bool | None  # True when other_cpu_share > 0.1: other work shared the CPU, so the speed figures are not
        # trusted (README tables leave the row out)
    load_s: float  # seconds of the model's from_pretrained (excluding a one-off GGUF conversion)

    # offload traffic, means per measured run (sum over the repeats / repeats)
    loads: float | None  # offloaded layer reads per run
    loaded_bytes: float | None  # bytes of offloaded layers read per run
    layer_load_s: float | None  # reader busy seconds per run (controller stats load_s; reader thread included)
    per_layer_load_ms: float | None  # layer_load_s / loads, in milliseconds
    wait_s: float | None  # seconds per run compute was stalled waiting for a layer
    forward_s: float | None  # seconds per run inside the model's forward calls
    overlap: float | None  # share of min(read time, compute time) hidden by prefetch (mean of the runs' values)


FIELDS = tuple(f.name for f in dataclasses.fields(Result))
