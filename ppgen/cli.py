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
    p.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip"],
                   help="on a NaN/Inf loss: stop the run (default) or skip that update")
    add_vae_zoo_flags(p)
    add_loop_flags(p)
    p.set_defaults(func=cmd_train_vae)


def add_vae_zoo_flags(p: argparse.ArgumentParser) -> None:
    """Guide family, likelihood and training aids of :class:`ppgen.models.vae.VAEConfig`."""
    from ppgen.models.likelihoods import LIKELIHOODS
    from ppgen.models.posteriors import POSTERIORS

    p.add_argument("--posterior", default="diag", choices=list(POSTERIORS),
                   help="guide family: diag, fullcov (Cholesky) or iaf (default: diag)")
    p.add_argument("--flows", type=_positive_int, default=2, help="IAF steps (--posterior iaf)")
    p.add_argument("--likelihood", default="bernoulli", choices=list(LIKELIHOODS),
                   help="bernoulli (0/1 data) or gaussian / cb (grey levels: add --binarize none)")
    p.add_argument("--gaussian-scale", type=_positive_float, default=None,
                   help="fixed sigma of the gaussian likelihood (default: learned per pixel)")
    p.add_argument("--kl-warmup", type=int, default=0, metavar="E",
                   help="KL warm-up: beta = min(1, epoch / E) on the latent sites (default 0: off)")
    p.add_argument("--free-bits", type=float, default=0.0, metavar="L",
                   help="free bits: nats per latent dimension (diag posterior; default 0: off)")


def vae_run_config(args: argparse.Namespace):
    """The :class:`ppgen.train.VAERunConfig` that ``ppgen train vae`` flags describe."""
    from ppgen.infer.svi import SVIConfig
    from ppgen.models.vae import VAEConfig
    from ppgen.train import VAERunConfig

    return VAERunConfig(
        data=data_config(args),
        model=VAEConfig(args.latent_dim, args.hidden, args.arch, args.posterior, args.likelihood, args.flows,
                        args.gaussian_scale, args.kl_warmup, args.free_bits),
        svi=SVIConfig(args.estimator, args.particles, args.epochs, args.batch_size, args.lr, args.seed,
                      args.device, args.on_nonfinite),
    )


def cmd_train_vae(args: argparse.Namespace) -> int:
    from ppgen.train import train_vae

    config = vae_run_config(args)
    done = train_vae(config, args.out, args.resume, args.overwrite, not args.no_progress, not args.no_download)
    if done.run is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    print(
        f"validation ELBO {done.result.val_elbo:.3f} nats; run written to {done.run.path} "
        f"(figures in {done.run.figures})"
    )
    return 0


# --------------------------------------------------------------------------- train cvae / m2


def add_train_cvae(sub) -> None:
    p = sub.add_parser("cvae", help="train a conditional VAE for image completion, with its regression baseline",
                       description="Train a conditional VAE p(y | x) that completes images from some quadrants, "
                       "and the deterministic regression baseline; report both conditional NLLs (cvae.json).")
    add_data_flags(p)
    p.add_argument("--latent-dim", type=_positive_int, default=8)
    p.add_argument("--hidden", type=_int_list, default=(256,), help="hidden widths, e.g. 256 or 512,256")
    p.add_argument("--observed", type=_quadrants, default=(0,),
                   help="quadrants given as input: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right (e.g. 0,2)")
    p.add_argument("--eval-samples", type=_positive_int, default=1000, help="K importance samples for log p(y | x)")
    add_loop_flags(p, epochs=30)
    p.set_defaults(func=cmd_train_cvae, batch_size=64)


def _quadrants(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected quadrant numbers 0-3 separated by commas, got {text!r}") from None


def cmd_train_cvae(args: argparse.Namespace) -> int:
    from ppgen.infer.svi import SVIConfig
    from ppgen.models.cvae import CVAEConfig
    from ppgen.models.zoo_runs import CVAERunConfig, train_cvae

    if args.resume:
        raise ValueError("ppgen train cvae does not resume; run it again with --overwrite")
    config = CVAERunConfig(
        data=data_config(args),
        model=CVAEConfig(args.latent_dim, args.hidden, args.observed),
        svi=SVIConfig("reparam", 1, args.epochs, args.batch_size, args.lr, args.seed, args.device),
        eval_samples=args.eval_samples,
    )
    done = train_cvae(config, args.out, args.overwrite, not args.no_progress, not args.no_download)
    m = done.metrics
    print(f"conditional NLL (nats per image, {m['pixels_completed']} pixels completed): "
          f"CVAE {m['cvae_nll']:.3f} +- {m['cvae_nll_stderr']:.3f} (IS, K={m['eval_samples']}), "
          f"baseline {m['baseline_nll']:.3f} +- {m['baseline_nll_stderr']:.3f}; run written to {done.run.path}")
    return 0


def add_train_m2(sub) -> None:
    p = sub.add_parser("m2", help="train the M2 model (class + style latents) by SVI",
                       description="Train the M2 model of Kingma et al. (2014) unsupervised: a categorical class "
                       "latent (enumerated or score-function) and a continuous style latent.")
    add_data_flags(p)
    p.add_argument("--num-classes", type=_positive_int, default=10)
    p.add_argument("--latent-dim", type=_positive_int, default=8, help="style latent width")
    p.add_argument("--hidden", type=_int_list, default=(256,), help="hidden widths, e.g. 256 or 512,256")
    p.add_argument("--discrete", default="enum", choices=["enum", "score"],
                   help="class latent: exact enumeration (default) or score function with a baseline")
    p.add_argument("--eval-samples", type=_positive_int, default=1000, help="K importance samples for log p(x)")
    add_loop_flags(p)
    p.set_defaults(func=cmd_train_m2)


def cmd_train_m2(args: argparse.Namespace) -> int:
    from ppgen.infer.svi import SVIConfig
    from ppgen.models.m2 import DISCRETE_ESTIMATORS, M2Config
    from ppgen.models.zoo_runs import M2RunConfig, train_m2

    if args.resume:
        raise ValueError("ppgen train m2 does not resume; run it again with --overwrite")
    config = M2RunConfig(
        data=data_config(args),
        model=M2Config(args.num_classes, args.latent_dim, args.hidden),
        svi=SVIConfig(DISCRETE_ESTIMATORS[args.discrete], 1, args.epochs, args.batch_size, args.lr, args.seed,
                      args.device),
        eval_samples=args.eval_samples,
    )
    done = train_m2(config, args.out, args.overwrite, not args.no_progress, not args.no_download)
    m = done.metrics
    print(f"test log p(x) {m['test_log_px']:.3f} +- {m['test_log_px_stderr']:.3f} nats (IS, K={m['eval_samples']}), "
          f"cluster accuracy {m['cluster_accuracy']:.3f}; run written to {done.run.path}")
    return 0


# --------------------------------------------------------------------------- train gan


def add_train_gan(sub) -> None:
    from ppgen.adversarial import LOSSES

    p = sub.add_parser("gan", help="train a GAN by the adversarial loop",
                       description="Train a GAN: decoder-class generator vs encoder-trunk discriminator.")
    add_data_flags(p)
    p.set_defaults(binarize="none")  # GANs model grey levels
    p.add_argument("--latent-dim", type=_positive_int, default=20)
    p.add_argument("--hidden", type=_int_list, default=(400,), help="hidden widths, e.g. 400 or 512,256")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv"])
    p.add_argument("--loss", default="ns", choices=list(LOSSES), help="GAN objective (default: ns)")
    p.add_argument("--d-steps", type=_positive_int, default=1, help="discriminator steps per generator step")
    p.add_argument("--lr-d", type=_positive_float, default=None, help="discriminator learning rate (default: --lr)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 of both optimizers")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 of both optimizers")
    add_loop_flags(p)
    p.set_defaults(lr=2e-4, func=cmd_train_gan)  # --lr is the generator's learning rate


def cmd_train_gan(args: argparse.Namespace) -> int:
    from ppgen.adversarial import GANConfig, LoopConfig, train_gan

    loop = LoopConfig(args.loss, args.d_steps, args.epochs, args.batch_size, args.lr,
                      args.lr_d if args.lr_d is not None else args.lr, args.beta1, args.beta2, args.seed, args.device)
    config = GANConfig(data_config(args), args.latent_dim, args.hidden, args.arch, loop)
    _, result, run = train_gan(config, args.out, args.resume, args.overwrite, not args.no_progress, not args.no_download)
    last = result.history[-1]
    print(f"epoch {last['epoch']}: loss_D {last['loss_D']:.3f}, loss_G {last['loss_G']:.3f}, "
          f"D(x) {last['D_real']:.3f}, D(G(z)) {last['D_fake']:.3f}; run written to {run.path} "
          f"(figures in {run.figures})")
    return 0


# --------------------------------------------------------------------------- sample


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid")
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/figures/samples-N.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--langevin-steps", type=_positive_int, default=None,
                   help="score runs: Langevin steps per noise level (default: the run's)")
    p.set_defaults(func=cmd_sample)


def sample_vae(args: argparse.Namespace, out: Path) -> None:
    import torch

    from ppgen.plots import save_image_grid
    from ppgen.train import load_vae

    vae, _, shape = load_vae(args.run, args.device)
    torch.manual_seed(args.seed)
    save_image_grid(vae.sample(args.n), shape, out)


def sample_gan(args: argparse.Namespace, out: Path) -> None:
    import torch

    from ppgen.adversarial import load_gan
    from ppgen.plots import save_image_grid

    generator, config = load_gan(args.run, args.device)
    save_image_grid(generator.sample(args.n, torch.Generator().manual_seed(args.seed)), config.data.image_shape, out)


#: run family (config.json "family") -> function(args, png_path) writing a sample grid.
SAMPLERS = {"vae": sample_vae}
SAMPLERS["gan"] = sample_gan


# --------------------------------------------------------------------------- train score


def add_train_score(sub) -> None:
    from ppgen.data import DATASETS, TOYS
    from ppgen.score import OBJECTIVES

    p = sub.add_parser("score", help="train a score model by score matching",
                       description="Train a score network s(x) = grad log p(x) by score matching; sample by Langevin.")
    p.add_argument("--data", default="8gaussians", choices=[*DATASETS, *TOYS], help="image dataset or 2-D toy")
    p.add_argument("--data-dir", default=None, help="folder holding torchvision's dataset folders")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split (toys: of the points)")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--toy-n", type=_positive_int, default=20000, help="training points drawn from a 2-D toy")
    p.add_argument("--objective", default="dsm", choices=list(OBJECTIVES),
                   help="; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    p.add_argument("--arch", default="mlp", choices=["mlp", "unet"], help="score network (unet: images, dsm)")
    p.add_argument("--hidden", type=_int_list, default=(128, 128), help="MLP hidden widths, e.g. 128,128")
    p.add_argument("--width", type=_positive_int, default=32, help="U-Net base channels")
    p.add_argument("--sigma-max", type=_positive_float, default=1.0, help="largest noise level (dsm)")
    p.add_argument("--sigma-min", type=_positive_float, default=0.01, help="smallest noise level (dsm)")
    p.add_argument("--n-sigmas", type=_positive_int, default=10, help="levels of the geometric ladder (dsm)")
    p.add_argument("--projections", type=_positive_int, default=1, help="random projections (ssm, ism-hutchinson)")
    p.add_argument("--langevin-steps", type=_positive_int, default=100, help="Langevin steps per noise level")
    p.add_argument("--eta", type=_positive_float, default=0.1, help="Langevin step at the smallest level / sigma_min^2")
    add_loop_flags(p)
    p.set_defaults(func=cmd_train_score)


def cmd_train_score(args: argparse.Namespace) -> int:
    from ppgen.score_train import ScoreConfig, train_score

    config = ScoreConfig(args.data, args.data_dir, args.split_seed, args.toy_n, args.objective, args.arch,
                         args.hidden, args.width, args.sigma_max, args.sigma_min, args.n_sigmas, args.projections,
                         args.epochs, args.batch_size, args.lr, args.seed, args.device, args.langevin_steps, args.eta)
    done = train_score(config, args.out, args.resume, args.overwrite, not args.no_progress, not args.no_download)
    last = done.history[-1]
    print(f"epoch {last['epoch']}: {config.objective} loss train {last['train_loss']:.4f}, "
          f"validation {last['val_loss']:.4f}; run written to {done.run.path} (figures in {done.run.figures})")
    return 0


def sample_score_run(args: argparse.Namespace, out: Path) -> None:
    from ppgen.score_train import sample_run

    sample_run(args.run, out, args.n, args.langevin_steps, args.seed, args.device)


SAMPLERS["score"] = sample_score_run


def cmd_sample(args: argparse.Namespace) -> int:
    from ppgen.runs import Run

    family = Run(args.run, resume=True).load_config().get("family")
    if family not in SAMPLERS:
        raise ValueError(f"{args.run} holds a run of family {family!r}; ppgen can sample {', '.join(SAMPLERS)}")
    out = Path(args.out) if args.out else Path(args.run) / "figures" / f"samples-{args.n}.png"
    SAMPLERS[family](args, out)
    print(f"wrote {args.n} samples to {out}")
    return 0


# --------------------------------------------------------------------------- metrics


def add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="sample-quality metrics of a trained run (stored as RUN/metrics.json)",
                       description="Classifier Frechet distance and Parzen log-likelihood of a run's samples.")
    p.add_argument("run", help="run directory (family vae or gan)")
    p.add_argument("--n", type=_positive_int, default=10000, help="samples drawn from the model")
    p.add_argument("--n-val", type=_positive_int, default=1000, help="validation images for the Parzen bandwidth")
    p.add_argument("--cache-dir", default=None, help="folder of cached feature classifiers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.set_defaults(func=cmd_metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    import json

    from ppgen.metrics import run_metrics

    result = run_metrics(args.run, args.n, args.n_val, args.cache_dir, args.seed, args.device, not args.no_download)
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    (Path(args.run) / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"stored in {Path(args.run) / 'metrics.json'}")
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


# --------------------------------------------------------------------------- evidence


def add_evidence(sub) -> None:
    p = sub.add_parser(
        "evidence",
        help="importance-sampled log p(x) of a trained VAE run (IWAE ladder, ESS, k-hat, AIS)",
        description="Per-datapoint log p(x) by importance sampling (Burda et al. 2016), with AIS "
        "and BDMC when --ais-steps > 0. Writes RUN/evidence.json and RUN/figures/{iwae_ladder,khat}.png.",
    )
    p.add_argument("run", help="run directory of a trained VAE")
    p.add_argument("--samples", type=_positive_int, default=5000, help="K importance samples per datapoint")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--limit", type=_positive_int, default=None, help="first N datapoints only (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=100, help="datapoints per chunk")
    p.add_argument("--particle-chunk", type=_positive_int, default=500, help="particles per vectorized pass")
    p.add_argument("--ais-steps", type=int, default=0, help="AIS annealing steps (0: no AIS)")
    p.add_argument("--ais-chains", type=_positive_int, default=16, help="AIS chains per datapoint")
    p.add_argument("--ais-limit", type=_positive_int, default=100, help="datapoints for AIS and BDMC")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evidence)


def cmd_evidence(args: argparse.Namespace) -> int:
    from ppgen.infer.evidence_report import EvidenceConfig, evidence_report, format_report
    from ppgen.runs import resolve_device
    from ppgen.train import load_vae

    config = EvidenceConfig(
        args.samples, args.split, args.limit, args.batch_size, args.particle_chunk,
        args.ais_steps, args.ais_chains, args.ais_limit, args.seed, args.device,
    )
    vae, run_config, _ = load_vae(args.run, args.device)
    data = getattr(run_config.data.load(False), config.split).to(resolve_device(args.device))
    vae.check_data(data)
    report = evidence_report(vae.model, vae.guide, data, config, args.run, progress=not args.no_progress)
    print(format_report(report))
    print(f"wrote {Path(args.run) / 'evidence.json'} and figures in {Path(args.run) / 'figures'}")
    return 0


# --------------------------------------------------------------------------- variance


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_variance(sub) -> None:
    p = sub.add_parser(
        "variance",
        help="gradient variance / SNR / bias of each estimator at a VAE run's checkpoints",
        description="Draw repeated gradient estimates at fixed parameters (initialization and the "
        "run's checkpoints) and write RUN/variance/{table.md,rows.jsonl,variance.png}.",
    )
    p.add_argument("run", help="run directory of a trained VAE")
    p.add_argument("--estimators", type=_name_list, default=("reparam", "stl", "score", "score-baseline", "score-nn-baseline"),
                   help="comma-separated estimator names")
    p.add_argument("--checkpoints", default="all", choices=["all", "last", "init"],
                   help="all: init + every kept checkpoint (checkpoints/epoch-XXX.pt) + the final one")
    p.add_argument("--draws", type=_positive_int, default=100, help="gradient draws per estimator")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="validation images in the batch")
    p.add_argument("--reference-draws", type=_positive_int, default=500, help="reparam draws in the reference")
    p.add_argument("--warmup", type=int, default=100, help="discarded draws so baselines adapt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_variance)


def cmd_variance(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from ppgen.infer.variance import format_table
    from ppgen.infer.variance_runs import VarianceConfig, measure_run, plot_variance

    config = VarianceConfig(args.estimators, args.checkpoints, args.draws, args.batch_size,
                            args.reference_draws, args.warmup, args.seed, args.device)
    kwargs = dataclasses.asdict(config)
    kwargs["num_draws"] = kwargs.pop("draws")
    results = measure_run(args.run, **kwargs)
    out = Path(args.run) / "variance"
    out.mkdir(parents=True, exist_ok=True)
    lines, rows = [], []
    for point, stats in results:
        lines += [f"## epoch {point.epoch}", "", *format_table(stats, ("all", "group"), config.estimators[0]), ""]
        rows += [{"epoch": point.epoch, **r} for r in stats.rows if r["level"] != "param"]
    (out / "table.md").write_text("\n".join(lines))
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_variance(results, out / "variance.png", f"gradient estimators on {args.run}")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'}, {out / 'rows.jsonl'} and {out / 'variance.png'}")
    return 0


def add_compare_estimators(sub) -> None:
    from ppgen.infer.estimators import ESTIMATORS

    p = sub.add_parser(
        "compare-estimators",
        help="train the same VAE with each estimator; validation ELBO vs steps and wall time",
        description="Train one VAE per estimator into OUT/<estimator> and plot OUT/compare.png.",
    )
    add_data_flags(p)
    p.add_argument("--estimators", type=_name_list, default=("reparam", "score", "score-baseline", "score-nn-baseline"),
                   help=f"comma-separated, from: {', '.join(ESTIMATORS)}")
    p.add_argument("--latent-dim", type=_positive_int, default=20)
    p.add_argument("--hidden", type=_int_list, default=(400,), help="hidden widths, e.g. 400 or 512,256")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="runs/compare-estimators", help="output folder")
    p.add_argument("--seconds", type=_positive_float, default=None,
                   help="equal wall-time budget per estimator (trains epoch by epoch up to --epochs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare_estimators)


def cmd_compare_estimators(args: argparse.Namespace) -> int:
    import json

    from ppgen.infer.svi import SVIConfig
    from ppgen.infer.variance_runs import compare_estimators, elbo_at_equal_time
    from ppgen.models.vae import VAEConfig
    from ppgen.train import VAERunConfig

    base = VAERunConfig(
        data=data_config(args),
        model=VAEConfig(args.latent_dim, args.hidden),
        svi=SVIConfig(args.estimators[0] if args.estimators else "reparam", 1, args.epochs, args.batch_size,
                      args.lr, args.seed, args.device),
    )
    histories = compare_estimators(base, args.estimators, args.out, not args.no_progress, not args.no_download,
                                   args.seconds)
    budget, at_budget = elbo_at_equal_time(histories)
    print(f"| estimator | final val ELBO | train s | val ELBO within {budget:.1f} s |")
    print("|---|---|---|---|")
    for name, hist in histories.items():
        print(f"| {name} | {hist[-1]['val_elbo']:.2f} | {hist[-1]['wall']:.1f} | {at_budget[name]:.2f} |")
    Path(args.out, "histories.json").write_text(json.dumps(histories, indent=1))
    print(f"wrote {Path(args.out) / 'compare.png'}")
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
    add_train_cvae(train_sub)
    add_train_m2(train_sub)
    add_train_gan(train_sub)
    add_train_score(train_sub)
    add_sample(sub)
    add_demo(sub)
    add_metrics(sub)
    add_evidence(sub)
    add_variance(sub)
    add_compare_estimators(sub)
    from ppgen.report import add_report  # the report command lives in its own module
    add_report(sub)
    return parser


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ppgen`` command; user errors print one line and exit with status 2."""
    from ppgen.data import DataNotFoundError
    from ppgen.runs import CheckpointError, Interrupted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError, FloatingPointError) as err:
        kind = "data not found" if isinstance(err, DataNotFoundError) else "error"
        print(f"ppgen: {kind}: {err}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"ppgen: interrupted: {err}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
