"""The ``ppgen`` command.

Each subcommand is an ``add_<name>(subparsers)`` function that registers its parser and sets
``func``; training flags map one-to-one onto the fields of the run's config dataclasses.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ppgen.cli.evaluate import (
    add_compare_estimators,
    add_demo,
    add_evidence,
    add_metrics,
    add_sample,
    add_variance,
)
from ppgen.cli.train import (
    add_train_cvae,
    add_train_gan,
    add_train_m2,
    add_train_model,
    add_train_score,
    add_train_vae,
    vae_run_config,
)

__all__ = ["main", "build_parser", "vae_run_config"]


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppgen", description="Deep generative models on Pyro: train, sample, evaluate."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train", help="train a model",
        description="Train a built-in model (vae, cvae, m2, gan, score) or your own Pyro model "
        "(ppgen train model FILE.py:NAME --guide FILE.py:NAME|auto --data NAME|FILE).")
    train_sub = train.add_subparsers(dest="family", required=True, metavar="FAMILY")
    add_train_vae(train_sub)
    add_train_cvae(train_sub)
    add_train_m2(train_sub)
    add_train_gan(train_sub)
    add_train_score(train_sub)
    add_train_model(train_sub)
    add_sample(sub)
    add_demo(sub)
    add_metrics(sub)
    add_evidence(sub)
    add_variance(sub)
    add_compare_estimators(sub)
    from ppgen.report import add_report  # the report command lives in its own module
    add_report(sub)
    from ppgen.compare_families import add_compare_families  # so does the family comparison
    add_compare_families(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ppgen`` command; user errors print one line and exit with status 2."""
    from ppgen.data import DataNotFoundError
    from ppgen.devices import leave_process_group
    from ppgen.runs import CheckpointError, Interrupted

    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        leave_process_group(wait=True)  # after an error only leave: the others may never arrive
        return status
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError, FloatingPointError) as err:
        kind = "data not found" if isinstance(err, DataNotFoundError) else "error"
        print(f"ppgen: {kind}: {err}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"ppgen: interrupted: {err}", file=sys.stderr)
        return 130
    finally:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
