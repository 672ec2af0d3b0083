"""``ppgen demo``: the showcase on the embedded digits, no download, no GPU.

The demo is a list of steps (:data:`STEPS`). Each step takes a :class:`DemoContext`, may add
what it trained to ``ctx.results`` for later steps, writes its figures under ``ctx.out`` and
returns the Markdown lines of its section of ``summary.md``. Later features add a step.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Union

from ppgen.data import DataConfig
from ppgen.infer.svi import SVIConfig
from ppgen.models.vae import VAEConfig
from ppgen.plots import plot_curves
from ppgen.train import VAERunConfig, train_vae

__all__ = ["DemoContext", "STEPS", "run_demo"]


@dataclasses.dataclass
class DemoContext:
    """What the demo's steps share."""

    out: Path  # output folder
    epochs: int  # epochs for each trained model
    seed: int
    device: str
    progress: bool
    results: dict[str, Any] = dataclasses.field(default_factory=dict)  # step outputs by name


def vae_step(ctx: DemoContext) -> list[str]:
    """Train the same VAE with the reparameterized and the score-function estimator."""
    rows, curves = [], {}
    for name in ("reparam", "score"):
        config = VAERunConfig(
            data=DataConfig("digits"),
            model=VAEConfig(latent_dim=10, hidden=(256,)),
            svi=SVIConfig(estimator=name, epochs=ctx.epochs, batch_size=64, seed=ctx.seed, device=ctx.device),
        )
        t0 = time.perf_counter()
        done = train_vae(config, ctx.out / f"vae-{name}", overwrite=True, progress=ctx.progress)
        seconds = time.perf_counter() - t0
        ctx.results[f"vae-{name}"] = done
        hist = done.result.history
        curves[name] = ([h["step"] for h in hist], [h["val_elbo"] for h in hist])
        test = done.run.metrics()[-1]["test_elbo"]
        rows.append(f"| {name} | {hist[-1]['val_elbo']:.2f} | {test:.2f} | {seconds:.1f} | "
                    f"![samples](vae-{name}/figures/samples.png) |")
    plot_curves(curves, ctx.out / "elbo_curves.png", "SVI steps", "validation ELBO (nats per image)",
                "VAE on 8x8 digits: reparameterized vs score-function gradients")
    return [
        "## VAE: reparameterized vs score-function gradients",
        "",
        f"Same VAE (64-256-10), {ctx.epochs} epochs, batch 64, Adam 1e-3, dynamic binarization; "
        "ELBO per image in nats (higher is better).",
        "",
        "| estimator | validation ELBO | test ELBO | seconds | samples |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "![validation ELBO per step](elbo_curves.png)",
        "",
    ]


def gan_step(ctx: DemoContext) -> list[str]:
    """A GAN on the same digits and the same network sizes as the VAE, with sample metrics for both."""
    import torch

    from ppgen.gan import GANConfig, LoopConfig, train_gan
    from ppgen.metrics import image_metrics

    config = GANConfig(DataConfig("digits", "none"), latent_dim=10, hidden=(256,),
                       loop=LoopConfig("ns", epochs=ctx.epochs, batch_size=64, seed=ctx.seed, device=ctx.device))
    t0 = time.perf_counter()
    generator, result, run = train_gan(config, ctx.out / "gan", overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    ctx.results["gan"] = generator
    data = config.data.load()
    models = {"GAN (ns)": (generator.sample(2000, torch.Generator().manual_seed(ctx.seed)), "gan/figures/samples.png")}
    if "vae-reparam" in ctx.results:
        torch.manual_seed(ctx.seed)
        models["VAE (reparam)"] = (ctx.results["vae-reparam"].vae.sample(2000).cpu(), "vae-reparam/figures/samples.png")
    rows = []
    for name, (samples, png) in models.items():
        m = image_metrics(samples.cpu(), data, n_val=len(data.val), cache_dir=ctx.out / "classifier")
        rows.append(f"| {name} | {m['frechet_distance']:.2f} | {m['parzen_log_likelihood']:.1f} +- "
                    f"{m['parzen_stderr']:.1f} | ![samples]({png}) |")
    last = result.history[-1]
    return [
        "## GAN on the same networks, and sample quality next to the VAE",
        "",
        f"Generator = decoder 10-256-64 + sigmoid, discriminator = encoder trunk 64-256 + scalar head; "
        f"non-saturating loss, {ctx.epochs} epochs, batch 64, Adam 2e-4 betas (0.5, 0.999), {seconds:.1f} s. "
        f"Last epoch: D(x) {last['D_real']:.2f}, D(G(z)) {last['D_fake']:.2f}.",
        "",
        f"Frechet distance in the features of a small digit classifier (test accuracy "
        f"{m['classifier_test_accuracy']:.2f}; validation vs test images: {m['frechet_distance_val_vs_test']:.2f}); "
        "Parzen log-likelihood of the grey-level test digits in nats, bandwidth chosen on validation "
        "data, 2000 samples (a weak, biased estimate: Theis et al. 2016).",
        "",
        "| model | classifier Frechet distance (lower is better) | Parzen log-likelihood | samples |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def evidence_step(ctx: DemoContext) -> list[str]:
    """Importance-sampled log p(x) of both VAEs on the test digits (Burda et al. 2016)."""
    from ppgen.infer.evidence_report import EvidenceConfig, evidence_report

    rows = []
    for name in ("vae-reparam", "vae-score"):
        done = ctx.results.get(name)
        if done is None:
            continue
        config = EvidenceConfig(samples=500, split="test", ais_steps=0, seed=ctx.seed, device=ctx.device)
        data = done.data.test.to(next(done.vae.parameters()).device)
        r = evidence_report(done.vae.model, done.vae.guide, data, config, ctx.out / name)
        ladder = " / ".join(f"{v:.2f}" for v in r["ladder"].values())
        rows.append(
            f"| {name} | {r['elbo']:.2f} | {ladder} | {r['log_px']:.2f} +- {r['log_px_stderr']:.2f} | "
            f"{r['median_ess']:.0f} | {r['khat_share_untrusted']:.0%} | {r['is_seconds']:.1f} |"
        )
    if not rows:
        return []
    return [
        "## Evidence: importance-sampled log p(x)",
        "",
        "Per test image, K = 500 proposals from the encoder (nats per image; IWAE bound at K = 1 / 5 / 50 / 500 "
        "from nested prefixes of the same samples; k-hat untrusted: the share of images whose Pareto k-hat exceeds "
        "min(1 - 1/log10 K, 0.7) = 0.63 at K = 500, Vehtari et al. 2024).",
        "",
        "| model | ELBO | IWAE K=1/5/50/500 | IS log p(x) | median ESS | k-hat untrusted | seconds |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "![IWAE bound vs K](vae-reparam/figures/iwae_ladder.png) ![k-hat](vae-reparam/figures/khat.png)",
        "",
    ]


def variance_step(ctx: DemoContext) -> list[str]:
    """Gradient variance and SNR of each estimator on the reparam VAE, at initialization and
    after training (Rainforth et al. 2018; Roeder et al. 2017; Mnih & Gregor 2014)."""
    import pyro
    import torch

    from ppgen.data import binarize
    from ppgen.infer.variance import gradient_stats
    from ppgen.infer.variance_runs import Checkpoint, plot_variance

    done = ctx.results.get("vae-reparam")
    if done is None:
        return []
    estimators = ["reparam", "stl", "score", "score-baseline", "score-nn-baseline"]
    device = next(done.vae.parameters()).device
    x = binarize(done.data.val[:64].to(device), torch.Generator(device=device).manual_seed(ctx.seed))
    torch.manual_seed(ctx.seed)
    fresh = done.config.model.build(done.data.dim, done.data.image_shape).to(device)
    results = []
    t0 = time.perf_counter()
    for epoch, vae in ((0, fresh), (ctx.epochs, done.vae)):
        pyro.clear_param_store()  # the store then holds exactly this VAE's parameters
        stats = gradient_stats(vae.model, vae.guide, x, estimators, num_draws=30, reference_draws=100,
                               warmup=20, seed=ctx.seed)
        results.append((Checkpoint(epoch, None), stats))
    seconds = time.perf_counter() - t0
    plot_variance(results, ctx.out / "variance.png", "VAE on 8x8 digits: gradient estimators")
    rows = []
    for (point, stats) in results:
        for est in estimators:
            enc, ref = stats.row(est, "encoder"), stats.row("reparam", "encoder")
            rows.append(f"| {point.epoch} | {est} | {enc['variance']:.3g} | {enc['variance'] / ref['variance']:.3g} | "
                        f"{enc['snr']:.3g} | {stats.row(est, 'decoder')['snr']:.3g} | {1000 * enc['seconds']:.1f} |")
    return [
        "## Gradient estimators: variance and signal-to-noise",
        "",
        f"Encoder gradient of one batch of 64 validation digits, 30 draws per estimator at fixed parameters, "
        f"at initialization (epoch 0) and after training; SNR = mean |E g| / sd(g). {seconds:.0f} s.",
        "",
        "| epoch | estimator | encoder variance | / reparam | encoder SNR | decoder SNR | ms/draw |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "![variance and SNR](variance.png)",
        "",
    ]


def score_step(ctx: DemoContext) -> list[str]:
    """Score models: noise-conditional DSM on the 8-Gaussians toy (score field, annealed Langevin
    samples) and a small U-Net on the 8x8 digits (sample grid)."""
    import torch

    from ppgen.score import GaussianMixture, ScoreConfig, train_score

    rows = []
    toy = ScoreConfig(data="8gaussians", toy_n=10000, objective="dsm", hidden=(128, 128), sigma_max=3.0,
                      sigma_min=0.1, n_sigmas=8, epochs=100, batch_size=256, lr=3e-3, langevin_steps=50,
                      seed=ctx.seed, device=ctx.device)
    digits = ScoreConfig(data="digits", objective="dsm", arch="unet", width=16, epochs=40, batch_size=64, lr=2e-3,
                         seed=ctx.seed, device=ctx.device)  # ladder, step size, EMA, denoising: the defaults
    for name, config in (("score-8gaussians", toy), ("score-digits", digits)):
        t0 = time.perf_counter()
        done = train_score(config, ctx.out / name, overwrite=True, progress=ctx.progress)
        ctx.results[name] = done
        rows.append((name, done.history[-1]["val_loss"], time.perf_counter() - t0))
    # known answer: the 8-Gaussians density is a mixture, so its noised score is exact
    from ppgen.data import TOY_RADIUS, TOY_STD

    angles = torch.arange(8) * (2 * torch.pi / 8)
    gm = GaussianMixture([1.0] * 8, (TOY_RADIUS * torch.stack([angles.cos(), angles.sin()], -1)).tolist(), TOY_STD)
    net = ctx.results["score-8gaussians"].net.cpu()
    rel = []
    with torch.no_grad():
        for sigma in (3.0, 0.1):
            x = gm.sample(2000, torch.Generator().manual_seed(0), sigma=sigma)
            ref = gm.score(x, sigma)
            rel.append(float((net(x, torch.full((2000,), sigma)) - ref).pow(2).sum(-1).mean() / ref.pow(2).sum(-1).mean()))
    return [
        "## Score model: denoising score matching + annealed Langevin",
        "",
        "Noise-conditional DSM over a geometric noise ladder (Song & Ermon 2019); samples by annealed "
        "Langevin dynamics with a final denoising step.",
        "",
        "| run | validation DSM loss | seconds | figure |",
        "|---|---|---|---|",
        *[f"| {n} | {v:.3f} | {t:.1f} | ![samples]({n}/figures/samples.png) |" for n, v, t in rows],
        "",
        f"8-Gaussians score error against the exact noised score, relative MSE: {rel[0]:.3f} at sigma=3, "
        f"{rel[1]:.3f} at sigma=0.1.",
        "",
    ]


def report_step(ctx: DemoContext) -> list[str]:
    """The closing step: ``metrics.json`` for the image runs, then ``ppgen report`` over every run
    the demo trained, written to ``ctx.out/report`` (keep this step last)."""
    import json

    from ppgen.metrics import RUN_SAMPLERS, run_metrics
    from ppgen.report import ReportConfig, write_report

    t0 = time.perf_counter()
    runs = [ctx.out / n for n in ("vae-reparam", "vae-score", "gan", "score-8gaussians", "score-digits")
            if (ctx.out / n / "config.json").exists()]
    if not runs:
        return []
    for path in runs:
        family = json.loads((path / "config.json").read_text()).get("family")
        # score runs are left out: 2000 annealed-Langevin samples of the U-Net take minutes on CPU
        if family in RUN_SAMPLERS and family != "score" and not (path / "metrics.json").exists():
            m = run_metrics(path, n=2000, n_val=270, cache_dir=ctx.out / "classifier", seed=ctx.seed,
                            device=ctx.device, download=False)
            (path / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    extra = [(cap, ctx.out / png) for cap, png in (
        ("gradient variance and SNR of each estimator, at initialization and after training", "variance.png"),
    ) if (ctx.out / png).exists()]
    intro = [f"ppgen demo on the embedded 8x8 digits: VAE (reparameterized and score-function gradients), GAN and "
             f"score models on the same network sizes, {ctx.epochs} epochs each (score models: their own schedule)."]
    page = write_report(runs, ReportConfig(out=str(ctx.out / "report"), title="ppgen demo report", khat_samples=500,
                                           khat_limit=270, seed=ctx.seed, device=ctx.device), extra, intro)
    return [
        "## Report",
        "",
        f"[report/report.html](report/report.html): one self-contained page ({page.stat().st_size / 1024:.0f} KiB) "
        f"over {len(runs)} runs, with its twin [report/report.md](report/report.md); "
        f"{time.perf_counter() - t0:.1f} s. Sample metrics of the score runs are left out here (minutes of "
        "Langevin sampling on CPU); `ppgen metrics RUN` adds them and a new `ppgen report` shows them.",
        "",
    ]


#: The demo's steps, in order; the report comes last as it reads every run the others trained.
STEPS: list[Callable[[DemoContext], list[str]]] = [
    vae_step, gan_step, evidence_step, variance_step, score_step, report_step,
]


def run_demo(
    out: Union[str, Path] = "runs/demo",
    epochs: int = 100,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Run every step into ``out`` and return the path of ``summary.md``."""
    ctx = DemoContext(Path(out), epochs, seed, device, progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lines = ["# ppgen demo on the embedded 8x8 digits", ""]
    for step in STEPS:
        lines += step(ctx)
    lines.append(f"Total time: {time.perf_counter() - t0:.0f} s.")
    summary = ctx.out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary
