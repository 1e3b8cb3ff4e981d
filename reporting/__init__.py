"""The report: every table, figure and generated sentence of README.md and results/README.md,
from results/*.csv. `python report.py` runs reporting.pages.main.

One module per block: tables (shared cell, table, marker and figure helpers), runs (the run
scripts' rows, exactness, the reference model beside the original), study (sweep.py's
suites), streaming (peers, cold reads, batches, profiles), beyond (embedding and head),
load (models larger than the device), timings (the quick start's capture and how long a
user waits), pages (the command line). The package imports bench,
offload_skip, estimate and sweep; none of those imports it.
"""
