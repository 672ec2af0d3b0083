"""``ppgen sample | metrics | demo | evidence | variance | compare-estimators``: commands that use
trained runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ppgen.cli.common import (
    int_list,
    name_list,
    positive_float,
    positive_int,
    add_data_flags,
    data_config,
)

# --------------------------------------------------------------------------- sample


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid")
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/figures/samples-N.png; model runs on a "
                   "data file: a .pt of the observed sites, default RUN/samples-N.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--langevin-steps", type=positive_int, default=None,
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

    from ppgen.gan import load_gan
    from ppgen.plots import save_image_grid

    generator, config = load_gan(args.run, args.device)
    save_image_grid(generator.sample(args.n, torch.Generator().manual_seed(args.seed)), config.data.image_shape, out)


#: run family (config.json "family") -> function(args, png_path) writing a sample grid.
SAMPLERS = {"vae": sample_vae}
SAMPLERS["gan"] = sample_gan


def sample_score_run(args: argparse.Namespace, out: Path) -> None:
    from ppgen.score import sample_run

    sample_run(args.run, out, args.n, args.langevin_steps, args.seed, args.device)


SAMPLERS["score"] = sample_score_run


def cmd_sample(args: argparse.Namespace) -> int:
    from ppgen.runs import Run

    family = Run(args.run, resume=True).load_config().get("family")
    if family == "model":  # a declared model: observed sites drawn under poutine.uncondition
        from ppgen.user_model_eval import sample_model_run

        draws, written = sample_model_run(args.run, args.n, args.out, args.seed, args.device)
        print(f"wrote {args.n} draws of {', '.join(draws)} to {written}")
        return 0
    if family not in SAMPLERS:
        raise ValueError(f"{args.run} holds a run of family {family!r}; ppgen can sample {', '.join(SAMPLERS)}")
    out = Path(args.out) if args.out else Path(args.run) / "figures" / f"samples-{args.n}.png"
    SAMPLERS[family](args, out)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _family(run: str) -> object:
    """The ``family`` of the run directory ``run`` (config.json)."""
    from ppgen.runs import Run

    return Run(run, resume=True).load_config().get("family")


# --------------------------------------------------------------------------- metrics


def add_metrics(sub) -> None:
    p = sub.add_parser("metrics", help="sample-quality metrics of a trained run (stored as RUN/metrics.json)",
                       description="In a feature classifier's space: Frechet distance, precision and recall "
                       "(Kynkaenniemi et al. 2019) and label balance of a run's samples against the test split; "
                       "and the Parzen log-likelihood. Writes RUN/metrics.json and RUN/figures/label_balance.png.")
    p.add_argument("run", help="run directory (family vae, gan or score)")
    p.add_argument("--k", type=positive_int, default=3, help="neighbour whose distance sets each ball (precision/recall)")
    p.add_argument("--n", type=positive_int, default=10000, help="samples drawn from the model")
    p.add_argument("--n-val", type=positive_int, default=1000, help="validation images for the Parzen bandwidth")
    p.add_argument("--cache-dir", default=None, help="folder of cached feature classifiers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.set_defaults(func=cmd_metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    import json

    from ppgen.metrics import run_metrics

    from ppgen.metrics_pr import plot_label_balance

    result = run_metrics(args.run, args.n, args.n_val, args.cache_dir, args.seed, args.device, not args.no_download,
                         args.k)
    for key, value in result.items():
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    (Path(args.run) / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot_label_balance({"test set": result["label_hist_data"], f"{result['family']} samples": result["label_hist_samples"]},
                             Path(args.run) / "figures" / "label_balance.png",
                             title=f"{args.run}: label total variation {result['label_tv']:.3f}")
    print(f"stored in {Path(args.run) / 'metrics.json'}; label balance chart {png}")
    return 0


# --------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the showcase: train on the embedded digits and write a summary")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--epochs", type=positive_int, default=100)
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
        help="importance-sampled log p(x) of a trained VAE or model run (IWAE ladder, ESS, k-hat, AIS)",
        description="Per-datapoint log p(x) by importance sampling (Burda et al. 2016), with AIS "
        "and BDMC when --ais-steps > 0. Writes RUN/evidence.json and RUN/figures/{iwae_ladder,khat}.png.",
    )
    p.add_argument("run", help="run directory of a trained VAE, or of ppgen train model")
    p.add_argument("--samples", type=positive_int, default=5000, help="K importance samples per datapoint")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--limit", type=positive_int, default=None, help="first N datapoints only (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="datapoints per chunk")
    p.add_argument("--particle-chunk", type=positive_int, default=500, help="particles per vectorized pass")
    p.add_argument("--ais-steps", type=int, default=0, help="AIS annealing steps (0: no AIS)")
    p.add_argument("--ais-chains", type=positive_int, default=16, help="AIS chains per datapoint")
    p.add_argument("--ais-limit", type=positive_int, default=100, help="datapoints for AIS and BDMC")
    p.add_argument("--ais-start", choices=["encoder", "prior"], default="encoder",
                   help="start of the AIS/BDMC path: the guide's q(z|x) (default; far fewer steps) or the prior")
    p.add_argument("--outer-samples", type=positive_int, default=100,
                   help="model runs with global latents: S outer draws of the globals for the joint "
                   "log p(x_1..N) (ppgen.joint_log_evidence; --samples is then K per datapoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--proposal", choices=["guide", "auto"], default=None,
                   help="guide: IS from the encoder (default); auto: refined per-datapoint q* proposals, the one "
                   "with the fewest k-hat above threshold within --budget (default with --gaps)")
    p.add_argument("--gaps", action="store_true",
                   help="report L[q], L[q*] and the approximation / amortization gaps, per datapoint and per run "
                   "(writes figures/gaps.png; implies --proposal auto)")
    p.add_argument("--budget", type=float, default=1.5, help="auto: cost limit, times plain IS with --samples")
    p.add_argument("--refine-steps", type=int, default=50, help="auto: Adam steps of each datapoint's q*")
    p.add_argument("--refine-samples", type=positive_int, default=16, help="auto: draws per refine step")
    p.add_argument("--pilot", type=positive_int, default=50, help="auto: datapoints the proposals are compared on")
    p.add_argument("--drop-keys", type=name_list, default=(), metavar="KEY[,KEY]",
                   help="model runs on dict data: call the model without these keys (e.g. ys,labelled of a "
                   "semi-supervised run trained without --train-only), so IS scores log p(x)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evidence)


def cmd_evidence(args: argparse.Namespace) -> int:
    from ppgen.infer.evidence_report import EvidenceConfig, evidence_report, format_report
    from ppgen.devices import resolve_device
    from ppgen.train import load_vae

    proposal = args.proposal or ("auto" if args.gaps else "guide")
    config = EvidenceConfig(
        args.samples, args.split, args.limit, args.batch_size, args.particle_chunk,
        args.ais_steps, args.ais_chains, args.ais_limit, args.ais_start, args.seed, args.device,
        proposal, args.gaps, args.budget, args.refine_steps, args.refine_samples, args.pilot, tuple(args.drop_keys),
    )
    if _family(args.run) == "model":  # a declared model (ppgen train model)
        if proposal != "guide":
            raise ValueError("--gaps and --proposal auto are for VAE runs (ppgen train vae); for a declared model use "
                             "ppgen.log_evidence(model, guide, x, proposal=Widened(Refined())) from Python "
                             "(one local Gaussian latent) or plain --proposal guide")
        from ppgen.user_model_eval import format_joint_report, model_evidence_report

        report = model_evidence_report(args.run, config, not args.no_progress, args.outer_samples)
        joint = report["evidence"] == "joint"
        print(format_joint_report(report) if joint else format_report(report))
        print(f"wrote {Path(args.run) / 'evidence.json'}" + ("" if joint else f" and figures in {Path(args.run) / 'figures'}"))
        return 0
    if config.drop_keys:
        raise ValueError("--drop-keys leaves keys of a dict data file out of a declared model's call (ppgen train "
                         "model); a VAE run's data is one image tensor: leave --drop-keys out")
    vae, run_config, _ = load_vae(args.run, args.device)
    data = getattr(run_config.data.load(False), config.split).to(resolve_device(args.device))
    vae.check_data(data)
    report = evidence_report(vae.model, vae.guide, data, config, args.run, progress=not args.no_progress)
    print(format_report(report))
    print(f"wrote {Path(args.run) / 'evidence.json'} and figures in {Path(args.run) / 'figures'}")
    return 0


# --------------------------------------------------------------------------- variance


def add_variance(sub) -> None:
    p = sub.add_parser(
        "variance",
        help="gradient variance / SNR / bias of each estimator at a VAE or model run's checkpoints",
        description="Draw repeated gradient estimates at fixed parameters (initialization and the "
        "run's checkpoints) and write RUN/variance/{table.md,rows.jsonl,variance.png}.",
    )
    p.add_argument("run", help="run directory of a trained VAE, or of ppgen train model")
    p.add_argument("--estimators", type=name_list, default=("reparam", "stl", "score", "score-baseline", "score-nn-baseline"),
                   help="comma-separated estimator names")
    p.add_argument("--checkpoints", default="all", choices=["all", "last", "init"],
                   help="all: init + every kept checkpoint (checkpoints/epoch-XXX.pt) + the final one")
    p.add_argument("--draws", type=positive_int, default=100, help="gradient draws per estimator")
    p.add_argument("--batch-size", type=positive_int, default=128, help="validation images in the batch")
    p.add_argument("--reference-draws", type=positive_int, default=500, help="reparam draws in the reference")
    p.add_argument("--warmup", type=int, default=100, help="discarded draws so baselines adapt")
    p.add_argument("--particles", type=int_list, default=(1,),
                   help="K, samples per gradient draw (iwae: the bound's K); a comma list, e.g. 1,10,50, sweeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_variance)


def cmd_variance(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from ppgen.infer.variance import format_table
    from ppgen.infer.variance_runs import VarianceConfig, measure_run, plot_variance

    config = VarianceConfig(args.estimators, args.checkpoints, args.draws, args.batch_size,
                            args.reference_draws, args.warmup, args.seed, args.device, args.particles)
    kwargs = dataclasses.asdict(config)
    kwargs["num_draws"] = kwargs.pop("draws")
    # one K: rows and figure keep the estimator names; several: a sweep, labelled "<name> K=<K>"
    kwargs["particles"] = config.particles[0] if len(config.particles) == 1 else list(config.particles)
    measure = measure_run
    if _family(args.run) == "model":  # a declared model (ppgen train model)
        from ppgen.user_model_eval import measure_model_run as measure
    results = measure(args.run, **kwargs)
    out = Path(args.run) / "variance"
    out.mkdir(parents=True, exist_ok=True)
    lines, rows = [], []
    for point, stats in results:
        lines += [f"## epoch {point.epoch}", "", *format_table(stats, ("all", "group"), config.estimators[0]), ""]
        rows += [{"epoch": point.epoch, **r} for r in stats.rows if r["level"] != "param"]
    lines += ["K: particles per draw. SNR: mean |E g| / sd(g), which reads about sqrt(2 / (pi R)) for pure "
              f"noise ({(2 / (3.141592653589793 * config.draws)) ** 0.5:.3g} at R = {config.draws} draws); "
              "SNR*: root-mean-square SNR with that noise subtracted (0 for pure noise, negative when below it). "
              "bias^2: debiased squared bias against the reference (can be negative by noise).", ""]
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
    p.add_argument("--estimators", type=name_list, default=("reparam", "score", "score-baseline", "score-nn-baseline"),
                   help=f"comma-separated, from: {', '.join(ESTIMATORS)}")
    p.add_argument("--latent-dim", type=positive_int, default=20)
    p.add_argument("--hidden", type=int_list, default=(400,), help="hidden widths, e.g. 400 or 512,256")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="runs/compare-estimators", help="output folder")
    p.add_argument("--seconds", type=positive_float, default=None,
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
