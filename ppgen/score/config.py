"""The configuration of a score run: :class:`ScoreConfig`, its validation, and what it derives
(the noise ladder, the Langevin step, the network, the objective and its noise).

A :class:`ScoreConfig` is what ``ppgen train score`` takes (one flag per field) and what a run
stores as config.json; :mod:`ppgen.score.loop` trains it. The stabilizers of Song & Ermon (2020),
*Improved techniques for training score-based generative models*, are each a field and a flag,
all on by default for ``dsm``:

- the noise ladder from the data (``sigma_max``/``n_sigmas`` None: techniques 1 and 2, resolved
  before training by :func:`ppgen.score.ladder.data_noise_ladder`, stored in config.json and described
  in ladder.json) and the step size from the ladder and ``T`` (``eta`` None: technique 4);
- the noise-conditional score ``s(x, sigma) = s(x) / sigma`` (technique 3), built into both nets;
  by default replaced by the preconditioning of Karras et al. (2022) (``precondition``: input scaled
  by ``1 / sqrt(sigma^2 + sigma_data^2)``, a Fourier embedding of ``log sigma`` in every hidden
  layer, the output a denoiser with EDM's skip/output scalings; :mod:`ppgen.score.networks`), with
  the data's mean, standard deviation and (images) range resolved from the training data and stored in config.json
  so sampling and ``--resume`` rebuild the same net (runs from before it load as ``precondition``
  False), and DSM weighted so each level trains ``F`` equally (``loss_weight`` edm;
  :func:`ppgen.score.objectives.ncsn_loss`);
- an EMA of the weights (``ema_decay``; technique 5, :class:`ppgen.ema.EMA`) that sampling,
  figures and ``ppgen metrics`` use, checkpointed so that resuming continues it exactly;
- the final denoising step ``x + sigma_min^2 s(x, sigma_min)`` (``denoise``; Jolicoeur-Martineau
  et al. 2021), and a start at the top level, ``mean + sigma_max z`` (``init``).

:func:`stored_config` reads a run's config.json with the fields it predates set to the values its
net was built with, so runs made before a field existed still load and resume.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ppgen.data import DATASETS, TOYS, DataConfig
from ppgen.score.ladder import langevin_step_size
from ppgen.score.networks import ScoreNet, UNetScore
from ppgen.score.objectives import OBJECTIVES, geometric_sigmas, ism_loss, ncsn_loss, ssm_loss

if TYPE_CHECKING:
    from ppgen.runs import Run

__all__ = ["ScoreConfig", "stored_config"]


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Everything ``ppgen train score`` needs; stored as the run's config.json."""

    data: str = "8gaussians"  # image dataset (ppgen.data.DATASETS, grey levels) or 2-D toy (TOYS)
    data_dir: Optional[str] = None  # folder with torchvision's dataset folders
    split_seed: int = 0  # train/validation split seed (toys: seed of the drawn points)
    toy_n: int = 20000  # training points drawn from a 2-D toy
    objective: str = "dsm"  # ism | ism-hutchinson | ssm | dsm (noise-conditional, geometric ladder)
    arch: str = "mlp"  # mlp, or unet (images, dsm only)
    hidden: tuple[int, ...] = (128, 128)  # MLP hidden widths
    width: int = 32  # U-Net base channels
    sigma_max: Optional[float] = None  # largest dsm noise level; None: largest distance of two training points (technique 1)
    sigma_min: float = 0.01  # smallest noise level of the dsm ladder
    n_sigmas: Optional[int] = None  # levels (1: DSM at sigma_max); None: fewest meeting the overlap rule (technique 2)
    ladder_subsample: int = 2000  # training points (seeded by split_seed) on which technique 1's distance is taken
    projections: int = 1  # random projections per point (ssm, ism-hutchinson)
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # points per step
    lr: float = 5e-4  # Adam learning rate (1e-3 sent a Fashion-MNIST MLP into saturated blobs after ~25 epochs)
    seed: int = 0  # seed of initialization, batches and noise
    device: str = "cpu"  # cpu or cuda
    langevin_steps: Optional[int] = None  # T, Langevin steps per level; None: 5 for dsm, 100 in total otherwise
    eta: Optional[float] = None  # step at the smallest level / sigma_min^2; None: technique 4 (dsm), 0.1 otherwise
    denoise: bool = True  # end annealed Langevin with x + sigma_min^2 s(x, sigma_min) (Tweedie's posterior mean)
    init: Optional[str] = None  # Langevin start: gaussian (data mean + sigma_max z) | uniform (data box); None: by objective
    ema_decay: float = 0.999  # EMA of the weights for sampling and metrics (technique 5); 0: sample the live weights
    precondition: bool = True  # dsm: EDM preconditioning of the net (Karras et al. 2022); False: s(x) / sigma (Song & Ermon)
    sigma_data: Optional[float] = None  # dsm + precondition: data std (all coordinates pooled); None: from the training data
    data_mean: Optional[float] = None  # dsm + precondition: data mean (pooled); None: from the training data
    data_range: Optional[tuple[float, float]] = None  # dsm + precondition, images: (min, max) entry the denoiser is clamped to; None: from the data
    loss_weight: Optional[str] = None  # dsm: edm (unit weight on the preconditioned output F) | sigma2 (lambda = sigma^2); None: edm if precondition
    noise_freqs: int = 12  # dsm + precondition: Fourier frequencies pi 2^(k/2), k < noise_freqs, of the noise embedding
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1 + t) / (10 + t)) at update t, forgetting the initial weights
    family: str = "score"  # model family, for `ppgen sample` and reports

    def __post_init__(self) -> None:
        if self.data not in DATASETS and self.data not in TOYS:
            raise ValueError(f"unknown data {self.data!r}; choose one of {', '.join([*DATASETS, *TOYS])}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.arch not in ("mlp", "unet"):
            raise ValueError(f"arch must be 'mlp' or 'unet', got {self.arch!r}")
        if self.arch == "unet" and (self.objective != "dsm" or self.data in TOYS):
            raise ValueError("arch 'unet' is noise-conditional and takes images: use it with --objective dsm on an image dataset")
        if not 0 < self.sigma_min <= (self.sigma_max or math.inf):
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        for name in ("n_sigmas", "projections", "epochs", "batch_size", "langevin_steps", "toy_n"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.ladder_subsample < 2:
            raise ValueError(f"ladder_subsample must be an integer >= 2, got {self.ladder_subsample}")
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"eta must be positive (or None for technique 4's rule), got {self.eta}")
        if self.eta is None and self.conditional and self.n_sigmas == 1:
            raise ValueError("eta None sets the step by technique 4, which needs n_sigmas >= 2; give eta (e.g. 0.1) "
                             "or more levels")
        if self.init not in (None, "gaussian", "uniform"):
            raise ValueError(f"init must be 'gaussian' or 'uniform' (or None), got {self.init!r}")
        if self.init == "gaussian" and not self.conditional:
            raise ValueError(f"init 'gaussian' starts at the top noise level; objective {self.objective!r} has no "
                             "ladder: use init 'uniform'")
        if self.sigma_data is not None and not (0 < self.sigma_data < math.inf):
            raise ValueError(f"sigma_data must be a positive finite number (or None: from the data), got {self.sigma_data}")
        if self.data_mean is not None and not math.isfinite(self.data_mean):
            raise ValueError(f"data_mean must be finite (or None: from the data), got {self.data_mean}")
        if self.data_range is not None and not (len(self.data_range) == 2 and self.data_range[0] < self.data_range[1]):
            raise ValueError(f"data_range must be (min, max) with min < max (or None: from the data), got {self.data_range}")
        if (self.sigma_data is not None or self.data_mean is not None or self.data_range is not None) and not (
                self.conditional and self.precondition):
            raise ValueError("sigma_data/data_mean/data_range set the preconditioning of a noise-conditional net: they "
                             "need objective 'dsm' with precondition True (leave them None otherwise)")
        if self.loss_weight not in (None, "edm", "sigma2"):
            raise ValueError(f"loss_weight must be 'edm' or 'sigma2' (or None: by precondition), got {self.loss_weight!r}")
        if self.loss_weight is not None and not self.conditional:
            raise ValueError(f"loss_weight weights the levels of the dsm ladder; objective {self.objective!r} has none: "
                             "leave it None")
        if self.loss_weight == "edm" and not self.precondition:
            raise ValueError("loss_weight 'edm' weights the preconditioned output F; with precondition False use "
                             "loss_weight 'sigma2' (Song & Ermon's lambda = sigma^2)")
        if not (isinstance(self.noise_freqs, int) and self.noise_freqs >= 0):
            raise ValueError(f"noise_freqs must be an integer >= 0, got {self.noise_freqs!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")

    @property
    def conditional(self) -> bool:
        return self.objective == "dsm"

    @property
    def sigmas(self) -> torch.Tensor:
        """The ladder ``(L,)``, descending; needs ``sigma_max`` and ``n_sigmas`` (:func:`ppgen.score.ladder.resolve_ladder`)."""
        if self.sigma_max is None or self.n_sigmas is None:
            raise ValueError("sigma_max/n_sigmas are None (set from the data): resolve them with "
                             "ppgen.score.resolve_ladder(config, train) first")
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.n_sigmas)

    @property
    def steps(self) -> int:
        """Langevin steps per level (noise-free objectives: in total)."""
        return self.langevin_steps or (5 if self.conditional else 100)

    def step_size(self, steps: Optional[int] = None) -> float:
        """Langevin step at the smallest level: ``eta sigma_min^2``, or for ``eta`` None technique 4's
        ``eps`` for this ladder's ratio and ``steps`` per level (noise-free objectives: ``0.1 sigma_min^2``)."""
        if self.eta is not None or not self.conditional:
            return (0.1 if self.eta is None else self.eta) * self.sigma_min**2
        gamma = (self.sigma_max / self.sigma_min) ** (1 / (self.n_sigmas - 1))
        return langevin_step_size(self.sigma_min, gamma, steps or self.steps)

    @property
    def image_shape(self) -> Optional[tuple[int, ...]]:
        return None if self.data in TOYS else DataConfig(self.data).image_shape

    def build(self) -> nn.Module:
        """The score network; a preconditioned one needs ``sigma_data``/``data_mean`` (:func:`ppgen.score.ladder.resolve_ladder`)."""
        dim = 2 if self.data in TOYS else math.prod(self.image_shape)
        pre = {}
        if self.conditional and self.precondition:
            if self.sigma_data is None or self.data_mean is None:
                raise ValueError("sigma_data/data_mean are None (set from the data): resolve them with "
                                 "ppgen.score.resolve_ladder(config, train) first")
            pre = {"sigma_data": self.sigma_data, "data_mean": self.data_mean, "data_range": self.data_range,
                   "noise_freqs": self.noise_freqs}
        if self.arch == "unet":
            return UNetScore(self.image_shape, self.width, **pre)
        return ScoreNet(dim, self.hidden, conditional=self.conditional, **pre)

    def loss(self, net: nn.Module, x: torch.Tensor, noise: Optional[dict] = None) -> torch.Tensor:
        """The objective on batch ``x`` (B, D), with the ``noise`` of :meth:`draw_noise` (rows of
        this batch) or, when None, noise drawn from torch's global stream."""
        noise = noise or {}
        if self.objective == "ism":
            return ism_loss(net, x)
        if self.objective == "ism-hutchinson":
            return ism_loss(net, x, "hutchinson", self.projections, noise.get("directions"))
        if self.objective == "ssm":
            return ssm_loss(net, x, self.projections, projections=noise.get("directions"))
        sigmas = self.sigmas.to(x.device)
        edm = self.precondition and self.loss_weight in (None, "edm")
        return ncsn_loss(net, x, sigmas, noise.get("levels"), noise.get("eps"), self.sigma_data if edm else None)

    def draw_noise(self, n: int, dim: int, generator: torch.Generator) -> dict:
        """The noise :meth:`loss` needs for ``n`` datapoints of dimension ``dim``, drawn from
        ``generator`` (on the training device), batch first: ``{"directions": (n, P, dim)}``
        (Gaussian for ssm, Rademacher for ism-hutchinson), ``{"levels": (n,), "eps": (n, dim)}``
        for dsm, nothing for exact ism."""
        device = generator.device
        if self.objective == "ism":
            return {}
        if self.objective in ("ssm", "ism-hutchinson"):
            v = torch.randn(n, self.projections, dim, generator=generator, device=device)
            return {"directions": v.sign() if self.objective == "ism-hutchinson" else v}
        return {"levels": torch.randint(self.n_sigmas, (n,), generator=generator, device=device),
                "eps": torch.randn(n, dim, generator=generator, device=device)}


#: config fields added later and the values that rebuild the runs made before them
_LEGACY = {"precondition": False, "sigma_data": None, "data_mean": None, "data_range": None, "loss_weight": "sigma2",
           "noise_freqs": 12}


def stored_config(run: Run) -> dict:
    """config.json of ``run``, with the fields it predates set to what its net was built with."""
    stored = run.load_config()
    return {**{k: v for k, v in _LEGACY.items() if k not in stored}, **stored}
