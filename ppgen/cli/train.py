"""``ppgen train FAMILY``: one ``add_train_<family>`` / ``cmd_train_<family>`` pair per model family."""

from __future__ import annotations

import argparse
from pathlib import Path

from ppgen.cli.common import (
    int_list,
    name_list,
    positive_float,
    positive_int,
    add_data_flags,
    add_loop_flags,
    data_config,
)



def add_svi_flags(p) -> None:
    """The SVI loop's flags shared by ``ppgen train vae`` and ``ppgen train model``."""
    from ppgen.infer.estimators import ESTIMATORS

    p.add_argument("--estimator", default="reparam", help=f"one of: {', '.join(ESTIMATORS)}")
    p.add_argument("--particles", type=positive_int, default=1, help="samples per gradient estimate")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep checkpoints/epoch-NNN.pt for every epoch (for ppgen variance --checkpoints all)")
    p.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip"],
                   help="on a NaN/Inf loss: stop the run (default) or skip that update")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile(fullgraph=True) the step's loss; where model, guide or estimator "
                        "do not compile, runs eagerly and says why in one line")


# --------------------------------------------------------------------------- train vae


def add_train_vae(sub) -> None:
    p = sub.add_parser("vae", help="train a VAE by SVI", description="Train a VAE by SVI.")
    add_data_flags(p)
    p.add_argument("--latent-dim", type=positive_int, default=20)
    p.add_argument("--hidden", type=int_list, default=(400,), help="hidden widths, e.g. 400 or 512,256")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv"])
    add_svi_flags(p)
    add_vae_zoo_flags(p)
    add_loop_flags(p)
    p.set_defaults(func=cmd_train_vae)


def add_vae_zoo_flags(p: argparse.ArgumentParser) -> None:
    """Guide family, likelihood and training aids of :class:`ppgen.models.vae.VAEConfig`."""
    from ppgen.models.likelihoods import LIKELIHOODS
    from ppgen.models.posteriors import POSTERIORS

    p.add_argument("--posterior", default="diag", choices=list(POSTERIORS),
                   help="guide family: diag, fullcov (Cholesky) or iaf (default: diag)")
    p.add_argument("--flows", type=positive_int, default=2, help="IAF steps (--posterior iaf)")
    p.add_argument("--likelihood", default="bernoulli", choices=list(LIKELIHOODS),
                   help="bernoulli (0/1 data) or gaussian / cb (grey levels: add --binarize none)")
    p.add_argument("--gaussian-scale", type=positive_float, default=None,
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
                      args.device, args.on_nonfinite, args.keep_checkpoints, args.compile),
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
    p.add_argument("--latent-dim", type=positive_int, default=8)
    p.add_argument("--hidden", type=int_list, default=(256,), help="hidden widths, e.g. 256 or 512,256")
    p.add_argument("--observed", type=_quadrants, default=(0,),
                   help="quadrants given as input: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right (e.g. 0,2)")
    p.add_argument("--eval-samples", type=positive_int, default=1000, help="K importance samples for log p(y | x)")
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
                       description="Train the M2 model of Kingma et al. (2014): a categorical class latent "
                       "(enumerated or score-function) and a continuous style latent; unsupervised, or "
                       "semi-supervised with --labels-fraction and the classifier term --alpha.")
    add_data_flags(p)
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--latent-dim", type=positive_int, default=8, help="style latent width")
    p.add_argument("--hidden", type=int_list, default=(256,), help="hidden widths, e.g. 256 or 512,256")
    p.add_argument("--discrete", default="enum", choices=["enum", "score"],
                   help="class latent: exact enumeration (default) or score function with a baseline")
    p.add_argument("--eval-samples", type=positive_int, default=1000, help="K importance samples for log p(x)")
    p.add_argument("--labels-fraction", type=float, default=0.0,
                   help="share of training images whose label is used (default 0: unsupervised)")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="weight of the classifier term log q(y|x) on labelled images (Kingma et al. 2014 use "
                   "0.1 N; default 0)")
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
        model=M2Config(args.num_classes, args.latent_dim, args.hidden, args.alpha),
        svi=SVIConfig(DISCRETE_ESTIMATORS[args.discrete], 1, args.epochs, args.batch_size, args.lr, args.seed,
                      args.device),
        eval_samples=args.eval_samples,
        labels_fraction=args.labels_fraction,
    )
    done = train_m2(config, args.out, args.overwrite, not args.no_progress, not args.no_download)
    m = done.metrics
    print(f"test log p(x) {m['test_log_px']:.3f} +- {m['test_log_px_stderr']:.3f} nats (IS, K={m['eval_samples']}), "
          f"accuracy {m['accuracy']:.3f} (cluster-matched {m['cluster_accuracy']:.3f}, {m['labels_used']} labels used); "
          f"run written to {done.run.path}")
    return 0


# --------------------------------------------------------------------------- train gan


def add_train_gan(sub) -> None:
    from ppgen.gan import LOSSES, LoopConfig

    defaults = LoopConfig()  # the stabilizer flags default to the config's values

    p = sub.add_parser("gan", help="train a GAN by the adversarial loop",
                       description="Train a GAN: decoder-class generator vs encoder-trunk discriminator.")
    add_data_flags(p)
    p.set_defaults(binarize="none")  # GANs model grey levels
    p.add_argument("--latent-dim", type=positive_int, default=20)
    p.add_argument("--hidden", type=int_list, default=(400,), help="hidden widths, e.g. 400 or 512,256")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv"])
    p.add_argument("--loss", default="ns", choices=list(LOSSES), help="GAN objective (default: ns)")
    p.add_argument("--d-steps", type=positive_int, default=1, help="discriminator steps per generator step")
    p.add_argument("--lr-d", type=positive_float, default=None, help="discriminator learning rate (default: --lr)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 of both optimizers")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 of both optimizers")
    p.add_argument("--spectral-norm", action=argparse.BooleanOptionalAction, default=defaults.spectral_norm,
                   help=f"spectral normalization of every discriminator layer (default: {defaults.spectral_norm})")
    p.add_argument("--r1-gamma", type=float, default=defaults.r1_gamma, metavar="GAMMA",
                   help=f"R1 penalty GAMMA/2 E||grad_x d(x)||^2 on real data; 0: off (default: {defaults.r1_gamma})")
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay, metavar="D",
                   help=f"average of the generator's weights used for sampling; 0: off (default: {defaults.ema_decay})")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=defaults.ema_warmup,
                   help=f"EMA decay min(D, (1+t)/(10+t)) at generator step t (default: {defaults.ema_warmup})")
    add_loop_flags(p)
    p.set_defaults(lr=2e-4, func=cmd_train_gan)  # --lr is the generator's learning rate


def cmd_train_gan(args: argparse.Namespace) -> int:
    from ppgen.gan import GANConfig, LoopConfig, train_gan

    loop = LoopConfig(args.loss, args.d_steps, args.epochs, args.batch_size, args.lr,
                      args.lr_d if args.lr_d is not None else args.lr, args.beta1, args.beta2, args.seed, args.device,
                      args.spectral_norm, args.r1_gamma, args.ema_decay, args.ema_warmup)
    config = GANConfig(data_config(args), args.latent_dim, args.hidden, args.arch, loop)
    _, result, run = train_gan(config, args.out, args.resume, args.overwrite, not args.no_progress, not args.no_download)
    if run is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    last = result.history[-1]
    print(f"epoch {last['epoch']}: loss_D {last['loss_D']:.3f}, loss_G {last['loss_G']:.3f}, "
          f"D(x) {last['D_real']:.3f}, D(G(z)) {last['D_fake']:.3f}; run written to {run.path} "
          f"(figures in {run.figures})")
    return 0


# --------------------------------------------------------------------------- train score


def add_train_score(sub) -> None:
    from ppgen.data import DATASETS, TOYS
    from ppgen.score import OBJECTIVES, ScoreConfig

    p = sub.add_parser("score", help="train a score model by score matching",
                       description="Train a score network s(x) = grad log p(x) by score matching; sample by Langevin.")
    p.add_argument("--data", default="8gaussians", choices=[*DATASETS, *TOYS], help="image dataset or 2-D toy")
    p.add_argument("--data-dir", default=None, help="folder holding torchvision's dataset folders")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split (toys: of the points)")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--toy-n", type=positive_int, default=20000, help="training points drawn from a 2-D toy")
    p.add_argument("--objective", default="dsm", choices=list(OBJECTIVES),
                   help="; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    p.add_argument("--arch", default="mlp", choices=["mlp", "unet"], help="score network (unet: images, dsm)")
    p.add_argument("--hidden", type=int_list, default=(128, 128), help="MLP hidden widths, e.g. 128,128")
    p.add_argument("--width", type=positive_int, default=32, help="U-Net base channels")
    p.add_argument("--sigma-max", type=positive_float, default=None,
                   help="largest noise level (dsm); default: the largest distance between two training points "
                        "(Song & Ermon 2020, technique 1)")
    p.add_argument("--sigma-min", type=positive_float, default=0.01, help="smallest noise level (dsm)")
    p.add_argument("--n-sigmas", type=positive_int, default=None,
                   help="levels of the geometric ladder (dsm); default: the fewest whose adjacent levels overlap by "
                        "0.5 in the data's dimension (technique 2; 20 for 2-D toys)")
    p.add_argument("--ladder-subsample", type=positive_int, default=2000,
                   help="training points on which the technique-1 distance is computed")
    p.add_argument("--projections", type=positive_int, default=1, help="random projections (ssm, ism-hutchinson)")
    p.add_argument("--langevin-steps", type=positive_int, default=None,
                   help="Langevin steps per noise level T (default 5; noise-free objectives: 100 in total)")
    p.add_argument("--eta", type=positive_float, default=None,
                   help="Langevin step at the smallest level / sigma_min^2; default: technique 4's rule for the "
                        "ladder and T (dsm), 0.1 otherwise")
    p.add_argument("--no-denoise", dest="denoise", action="store_false",
                   help="skip the final denoising step x + sigma_min^2 s(x, sigma_min)")
    p.add_argument("--init", default=None, choices=["gaussian", "uniform"],
                   help="Langevin start: data mean + sigma_max z (default for dsm) or uniform in the data's box")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="decay of the EMA of the weights used for sampling and metrics (0: none)")
    p.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                   help="constant EMA decay from the first step (default: min(decay, (1+t)/(10+t)))")
    p.add_argument("--no-precondition", dest="precondition", action="store_false",
                   help="dsm: the net as s(x) / sigma (Song & Ermon 2020) instead of EDM's preconditioning "
                        "(Karras et al. 2022)")
    p.add_argument("--sigma-data", type=positive_float, default=None,
                   help="dsm, preconditioned: the data's standard deviation (default: from the training data)")
    p.add_argument("--loss-weight", default=None, choices=["edm", "sigma2"],
                   help="dsm: weight of each noise level: edm (unit weight on the preconditioned net's output; "
                        "default when preconditioned) or sigma2 (lambda = sigma^2, Song & Ermon; default with "
                        "--no-precondition). --resume keeps the run's own")
    p.add_argument("--noise-freqs", type=int, default=12,
                   help="dsm, preconditioned: Fourier frequencies pi*2^(k/2), k < N, of the noise-level embedding")
    add_loop_flags(p)
    p.set_defaults(lr=ScoreConfig.lr, func=cmd_train_score)


def cmd_train_score(args: argparse.Namespace) -> int:
    from ppgen.score import ScoreConfig, train_score

    names = ("data", "data_dir", "split_seed", "toy_n", "objective", "arch", "hidden", "width", "sigma_max", "sigma_min",
             "n_sigmas", "ladder_subsample", "projections", "epochs", "batch_size", "lr", "seed", "device",
             "langevin_steps", "eta", "denoise", "init", "ema_decay", "ema_warmup", "precondition", "sigma_data",
             "loss_weight", "noise_freqs")
    config = ScoreConfig(**{k: getattr(args, k) for k in names})
    done = train_score(config, args.out, args.resume, args.overwrite, not args.no_progress, not args.no_download)
    if done.run is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    last, c = done.history[-1], done.config
    if c.conditional:
        print(f"noise ladder: {c.n_sigmas} levels from sigma_max {c.sigma_max:.4g} to {c.sigma_min:.4g}; "
              f"{c.steps} Langevin steps per level, step {c.step_size():.3g} at sigma_min (ladder.json)")
    ema = f", EMA {last['val_loss_ema']:.4f}" if "val_loss_ema" in last else ""
    print(f"epoch {last['epoch']}: {config.objective} loss train {last['train_loss']:.4f}, "
          f"validation {last['val_loss']:.4f}{ema}; run written to {done.run.path} (figures in {done.run.figures})")
    return 0


# --------------------------------------------------------------------------- train model (a declared model)


def add_train_model(sub) -> None:
    from ppgen.data import BINARIZATIONS, DATASETS
    from ppgen.models.posteriors import POSTERIORS

    p = sub.add_parser(
        "model", help="train your own Pyro model (FILE.py:NAME) by SVI",
        description="Train a Pyro model/guide pair declared in your own file by SVI into a normal run "
        "directory, which ppgen evidence, ppgen variance and ppgen report then read. The file is imported "
        "(it runs, as python FILE.py would): name only files you trust. Resuming imports it again; a "
        "changed model, guide or data file refuses the resume unless --allow-changed-files.",
        epilog="example: ppgen train model my_model.py:model --guide my_model.py:guide --data points.npy "
        "--out runs/mine --epochs 20")
    p.add_argument("model", metavar="FILE.py:NAME",
                   help="the Pyro model: a callable in FILE.py (NAME may be dotted, e.g. net.model)")
    p.add_argument("--guide", default="auto", metavar="FILE.py:NAME|auto",
                   help="its guide, or auto: an amortized encoder guide built from the model (default: auto)")
    p.add_argument("--guide-family", default="diag", choices=list(POSTERIORS),
                   help="--guide auto: posterior family of continuous local latents (default: diag)")
    p.add_argument("--guide-hidden", type=int_list, default=(400,), help="--guide auto: encoder hidden widths")
    p.add_argument("--guide-flows", type=positive_int, default=2, help="--guide auto: IAF steps (--guide-family iaf)")
    p.add_argument("--guide-discrete", default="enumerate", choices=["enumerate", "score"],
                   help="--guide auto: discrete local latents, enumerated or by score function")
    p.add_argument("--data", required=True, metavar="NAME|FILE",
                   help=f"a built-in dataset ({', '.join(DATASETS)}) or a .npy / .npz / .pt file: a tensor (N, ...) "
                   "passed as model(x), or a dict of tensors aligned on dim 0 passed as model(**batch)")
    p.add_argument("--data-plate", default="data", help="name of the model's plate over datapoints (default: data)")
    p.add_argument("--binarize", default=None, choices=BINARIZATIONS,
                   help="built-in datasets: binarization (default: dynamic); files are used as they are")
    p.add_argument("--data-dir", default=None, help="folder holding torchvision's dataset folders")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation(/test) split")
    p.add_argument("--val-fraction", type=positive_float, default=0.1, help="data files: share of rows for validation")
    p.add_argument("--test-fraction", type=positive_float, default=0.1, help="data files: share of rows for testing")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "keep"],
                   help="cast floating-point data to float32 (default; numpy saves float64) or float64, or keep it")
    p.add_argument("--train-only", type=name_list, default=(), metavar="KEY[,KEY]",
                   help="dict data files: keys used in training only, e.g. labels and their mask (ys,labelled); "
                   "validation, test ELBO, evidence and samples call the model without them (log p(x))")
    p.add_argument("--no-download", action="store_true", help="never download data")
    add_svi_flags(p)
    p.add_argument("--allow-changed-files", action="store_true",
                   help="--resume even if the model, guide or data file changed (warns; records the new digests)")
    add_loop_flags(p)
    p.set_defaults(func=cmd_train_model)


def model_run_config(args: argparse.Namespace):
    """The :class:`ppgen.user_models.ModelRunConfig` that ``ppgen train model`` flags describe."""
    from ppgen.infer.svi import SVIConfig
    from ppgen.user_models import FILE_SUFFIXES, ModelDataConfig, ModelRunConfig, resolve_spec

    is_file = Path(args.data).suffix.lower() in FILE_SUFFIXES
    if is_file and args.binarize not in (None, "none"):
        raise ValueError(f"--binarize {args.binarize} applies to built-in datasets only; {args.data} is used as it is")
    data = ModelDataConfig(
        str(Path(args.data).expanduser().resolve()) if is_file else args.data,
        args.binarize or ("none" if is_file else "dynamic"),
        None if is_file else args.data_dir, args.split_seed, args.val_fraction, args.test_fraction, None, args.dtype,
        args.train_only,
    )
    return ModelRunConfig(
        model=resolve_spec(args.model, "model"),
        guide=resolve_spec(args.guide, "guide"),
        data=data,
        svi=SVIConfig(args.estimator, args.particles, args.epochs, args.batch_size, args.lr, args.seed,
                      args.device, args.on_nonfinite, args.keep_checkpoints, args.compile),
        data_plate=args.data_plate,
        guide_family=args.guide_family,
        guide_hidden=args.guide_hidden,
        guide_flows=args.guide_flows,
        guide_discrete=args.guide_discrete,
    )


def cmd_train_model(args: argparse.Namespace) -> int:
    from ppgen.user_models import train_model

    done = train_model(model_run_config(args), args.out, args.resume, args.overwrite, not args.no_progress,
                       not args.no_download, args.allow_changed_files)
    if done.run is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    test = [r["test_elbo"] for r in done.run.metrics() if "test_elbo" in r][-1]
    print(f"validation ELBO {done.result.val_elbo:.3f}, test ELBO {test:.3f} nats per datapoint; "
          f"run written to {done.run.path}")
    return 0
