"""What the scripts measure: the variants, how each keeps the offloaded layers, and the
prompts they decode. Below the command line, the run and its row, which all name them."""
from __future__ import annotations

VARIANTS = ("baseline", "kvcache", "diskoffload")
# How each variant keeps the offloaded layers (see offload_skip.patch_model); the
# baseline is the unpatched model, everything resident.
VARIANT_MODES = {"baseline": "resident", "kvcache": "session", "diskoffload": "stream"}

DEFAULT_PROMPT = "The history of the printing press in Europe began when"
# --batch-size N takes the first N (cycling): --prompt, then these; unequal lengths, so the
# batch is really left-padded.
BATCH_PROMPTS = (
    "Photosynthesis converts light into",
    "The first steam locomotive",
    "In mathematics, a prime number is a natural number greater than one that",
    "The river flows",
    "Early computers filled entire rooms and were programmed by",
    "Mount Everest",
    "The Roman Empire was divided into an eastern and a western half after",
    "Bees communicate the location of flowers by",
    "A violin has four strings tuned in",
    "The periodic table arranges the chemical elements by",
    "Glaciers form where",
    "The printing of banknotes requires special paper and inks because",
    "Octopuses have three hearts and",
    "The speed of sound in air depends mainly on",
    "Ancient libraries stored texts on",
)
