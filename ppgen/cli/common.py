"""Argument types and flag groups shared by the ``ppgen`` subcommands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    return tuple(positive_int(t) for t in text.split(",") if t.strip())


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """Flags of :class:`ppgen.data.DataConfig`."""
    from ppgen.data import BINARIZATIONS, DATASETS

    p.add_argument("--data", default="digits", choices=list(DATASETS), help="dataset (default: digits, embedded)")
    p.add_argument("--data-dir", default=None, help="folder holding torchvision's dataset folders")
    p.add_argument("--binarize", default="dynamic", choices=BINARIZATIONS, help="binarization (default: dynamic)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--no-download", action="store_true", help="never download data")


def add_loop_flags(p: argparse.ArgumentParser, epochs: int = 10) -> None:
    """Flags shared by every training loop, and the run directory flags."""
    p.add_argument("--epochs", type=positive_int, default=epochs)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", required=True, help="run directory to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def data_config(args: argparse.Namespace):
    from ppgen.data import DataConfig

    return DataConfig(args.data, args.binarize, args.data_dir, args.split_seed)


def name_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())
