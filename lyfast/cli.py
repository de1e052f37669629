"""Argument types shared by lyfast's command lines (`python -m lyfast profile-memory`, `python -m benchmarks`).

Each is an argparse `type=`: a bad value ends the run with argparse's one-line error naming the value and
the valid ones, exit code 2 — never a traceback deep inside a model.
"""
from __future__ import annotations

import argparse

import torch

# Accepted spellings -> torch dtype name (the name the reports record).
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def dtype_name(text: str) -> str:
    """A dtype spelling (fp32, bf16, fp16, float32, ...) -> its torch name."""
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; valid: {', '.join(DTYPES)}") from None


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def items(valid, *, also=()):
    """A comma list whose every element is in `valid` (or `also`, e.g. "all"): the list."""
    valid = list(valid)

    def parse(text: str) -> list[str]:
        got = _split(text)
        bad = [t for t in got if t not in valid and t not in also]
        if bad or not got:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(repr, bad)) if bad else 'empty list'}: valid are {', '.join([*valid, *also])}")
        return got

    return parse


def positive(kind=int):
    """A number > 0 of `kind` (int or float)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive {kind.__name__}")
        return value

    return parse


def positive_items(kind=int):
    """A comma list of numbers > 0 of `kind`: the list."""
    one = positive(kind)

    def parse(text: str):
        got = _split(text)
        if not got:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of positive {kind.__name__}s")
        return [one(t) for t in got]

    return parse


def device(text: str) -> str:
    """cpu, or cuda / cuda:N when CUDA is available."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: valid devices are cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here; use cpu")
    return text


def resolution(text: str) -> int:
    """Image pixels per side: a positive multiple of 16 (the VAE's 8x and the DiTs' 2x2 patches; SD3.5, Qwen-Image
    and Cosmos fail deep in the model at a multiple of 8 only)."""
    value = positive(int)(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive multiple of 16 (e.g. {value // 16 * 16 or 16})")
    return value
