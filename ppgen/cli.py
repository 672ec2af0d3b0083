"""The ``ppgen`` command.

Each subcommand is an ``add_<name>(subparsers)`` function that registers its parser and sets
``func``; training flags map one-to-one onto the fields of the run's config dataclasses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(t) for t in text.split(",") if t.strip())


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
    p.add_argument("--epochs", type=_positive_int, default=epochs)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
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


# --------------------------------------------------------------------------- train vae


def add_train_vae(sub) -> None:
    from ppgen.infer.estimators import ESTIMATORS

    p = sub.add_parser("vae", help="train a VAE by SVI", description="Train a VAE by SVI.")
    add_data_flags(p)
    p.add_argument("--latent-dim", type=_positive_int, default=20)
    p.add_argument("--hidden", type=_int_list, default=(400,), help="hidden widths, e.g. 400 or 512,256")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv"])
    p.add_argument("--estimator", default="reparam", help=f"one of: {', '.join(ESTIMATORS)}")
    p.add_argument("--particles", type=_positive_int, default=1, help="samples per gradient estimate")
    add_loop_flags(p)
    p.set_defaults(func=cmd_train_vae)


def cmd_train_vae(args: argparse.Namespace) -> int:
    from ppgen.infer.svi import SVIConfig
    from ppgen.models.vae import VAEConfig
    from ppgen.train import VAERunConfig, train_vae

    config = VAERunConfig(
        data=data_config(args),
        model=VAEConfig(args.latent_dim, args.hidden, args.arch),
        svi=SVIConfig(args.estimator, args.particles, args.epochs, args.batch_size, args.lr, args.seed, args.device),
    )
    done = train_vae(config, args.out, args.resume, args.overwrite, not args.no_progress, not args.no_download)
    print(
        f"validation ELBO {done.result.val_elbo:.3f} nats; run written to {done.run.path} "
        f"(figures in {done.run.figures})"
    )
    return 0


# --------------------------------------------------------------------------- sample


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid")
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/figures/samples-N.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)


def sample_vae(args: argparse.Namespace, out: Path) -> None:
    import torch

    from ppgen.plots import save_image_grid
    from ppgen.train import load_vae

    vae, _, shape = load_vae(args.run, args.device)
    torch.manual_seed(args.seed)
    save_image_grid(vae.sample(args.n), shape, out)


#: run family (config.json "family") -> function(args, png_path) writing a sample grid.
SAMPLERS = {"vae": sample_vae}


def cmd_sample(args: argparse.Namespace) -> int:
    from ppgen.runs import Run

    family = Run(args.run, resume=True).load_config().get("family")
    if family not in SAMPLERS:
        raise ValueError(f"{args.run} holds a run of family {family!r}; ppgen can sample {', '.join(SAMPLERS)}")
    out = Path(args.out) if args.out else Path(args.run) / "figures" / f"samples-{args.n}.png"
    SAMPLERS[family](args, out)
    print(f"wrote {args.n} samples to {out}")
    return 0


# --------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the showcase: train on the embedded digits and write a summary")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--epochs", type=_positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ppgen.demo import run_demo

    summary = run_demo(args.out, args.epochs, args.seed, args.device, not args.no_progress)
    print(summary.read_text())
    print(f"demo written to {summary.parent}")
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppgen", description="Deep generative models on Pyro: train, sample, evaluate."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train a model", description="Train a model.")
    train_sub = train.add_subparsers(dest="family", required=True, metavar="FAMILY")
    add_train_vae(train_sub)
    add_sample(sub)
    add_demo(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ppgen`` command; user errors print one line and exit with status 2."""
    from ppgen.data import DataNotFoundError
    from ppgen.runs import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError, FloatingPointError) as err:
        kind = "data not found" if isinstance(err, DataNotFoundError) else "error"
        print(f"ppgen: {kind}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
