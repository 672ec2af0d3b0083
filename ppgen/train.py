"""Whole training runs: data + model + loop + run directory, as the CLI and the demo use them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple, Union

import torch

from ppgen.data import DataConfig, Dataset, binarize
from ppgen.infer.svi import SVIConfig, SVIResult, evaluate_elbo, load_params, train_svi
from ppgen.models.vae import VAE, VAEConfig
from ppgen.plots import save_image_grid
from ppgen.devices import distributed, resolve_device
from ppgen.runs import (
    Run,
    check_resumable,
    config_from_dict,
    config_to_dict,
    seed_everything,
)

__all__ = ["VAERunConfig", "VAERun", "train_vae", "load_vae"]


@dataclasses.dataclass(frozen=True)
class VAERunConfig:
    """Everything ``ppgen train vae`` needs; stored as the run's config.json."""

    data: DataConfig = DataConfig()  # dataset and binarization
    model: VAEConfig = VAEConfig()  # architecture
    svi: SVIConfig = SVIConfig()  # estimator and loop settings
    family: str = "vae"  # model family, for `ppgen sample` and reports


class VAERun(NamedTuple):
    """A trained VAE with its data, config, run directory and training result."""

    vae: VAE
    data: Dataset
    config: VAERunConfig
    run: Run
    result: SVIResult


def train_vae(
    config: VAERunConfig,
    out: Union[str, Path],
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    download: bool = True,
) -> VAERun:
    """Train a :class:`VAE` as ``config`` says, writing the run directory ``out``.

    Writes config.json, metrics.jsonl (one line per epoch, plus the final test ELBO),
    checkpoint.pt, and figures/samples.png and figures/reconstructions.png.
    """
    job = distributed(resolve_device(config.svi.device))
    rank, device = job.rank, job.place(resolve_device(config.svi.device))
    run = Run(out, resume=resume, overwrite=overwrite) if rank == 0 or resume else None
    if resume:
        check_resumable(run.load_config(), config_to_dict(config), may_change={"svi.epochs", "svi.device", "svi.keep_checkpoints"})
    if rank == 0:
        run.save_config(config_to_dict(config))
    data = config.data.load(download)
    seed_everything(config.svi.seed)  # network initialisation is part of the seeded run
    vae = config.model.build(data.dim, data.image_shape).to(device)
    _check_likelihood_data(config, data)
    if not data.dynamic:
        vae.check_data(data.train)
    vae.check_data(data.val)
    result = train_svi(
        vae.model,
        vae.guide,
        data.train,
        data.val,
        config.svi,
        run=run,
        transform=binarize if data.dynamic else None,
        progress=progress,
        step_context=vae.objective if (vae.kl_warmup or vae.free_bits) else None,
    )
    if rank == 0:
        test_elbo = evaluate_elbo(vae.model, vae.guide, data.test.to(device))
        run.log({"epoch": config.svi.epochs, "test_elbo": test_elbo})
        _vae_figures(vae, data, run.figures)
    return VAERun(vae, data, config, run if rank == 0 else None, result)  # rank 0 reports


def _check_likelihood_data(config: VAERunConfig, data: Dataset) -> None:
    """Grey-level likelihoods (gaussian, cb) score the pixels as they are: refuse binarized data."""
    if config.model.likelihood != "bernoulli" and config.data.binarization != "none":
        raise ValueError(
            f"likelihood {config.model.likelihood!r} models grey levels in [0, 1] but the data is "
            f"binarized ({config.data.binarization!r}); use --binarize none (binarization='none')"
        )


def _vae_figures(vae: VAE, data: Dataset, figures: Path, n: int = 64) -> None:
    device = next(vae.parameters()).device
    torch.manual_seed(0)
    save_image_grid(vae.sample(n), data.image_shape, figures / "samples.png")
    x = data.test[: n // 2].to(device)
    pairs = torch.stack([x, vae.reconstruct(x)], 1).reshape(n, -1)  # original, reconstruction
    save_image_grid(pairs, data.image_shape, figures / "reconstructions.png", nrow=16)


def load_vae(path: Union[str, Path], device: str = "cpu") -> tuple[VAE, VAERunConfig, tuple]:
    """Rebuild the VAE of run directory ``path`` from config.json and checkpoint.pt.

    :returns: ``(vae, config, image_shape)``.
    """
    import pyro

    run = Run(path, resume=True)
    config = config_from_dict(VAERunConfig, run.load_config())
    ckpt = run.load_checkpoint(map_location=resolve_device(device))
    shape = config.data.image_shape
    vae = config.model.build(math.prod(shape), shape).to(device)
    pyro.clear_param_store()
    pyro.module("encoder", vae.encoder)
    pyro.module("decoder", vae.decoder)
    pyro.module("posterior", vae.posterior)  # no parameters for the default guide and likelihood
    pyro.module("likelihood", vae.likelihood)
    owners = ("encoder", "decoder", "posterior", "likelihood")
    load_params({k: v for k, v in ckpt["params"].items() if k.split("$$$")[0] in owners})
    return vae, config, shape
