"""Variational autoencoder as a Pyro model/guide pair (Kingma & Welling 2014).

model: ``z ~ N(0, I)``, ``x ~ Bernoulli(logits=decoder(z))``, one pair per datapoint inside the
``"data"`` plate; guide: ``z ~ N(encoder(x))``, an amortized diagonal Normal. The guide's site is
reparameterized; score-function estimators switch that off from outside (see
:mod:`ppgen.infer.estimators`), so the same model is trained by every estimator.

The guide family (``posterior``: diag, fullcov, iaf; :mod:`ppgen.models.posteriors`) and the
likelihood (``likelihood``: bernoulli, gaussian, cb; :mod:`ppgen.models.likelihoods`) are
options; the defaults are the model above, with the same sites and parameter names.

Training aids (seed 003, 2.8.1), active only inside :meth:`VAE.objective` so that evaluation
always scores the true ELBO:

- KL warm-up (Bowman et al. 2016; Sonderby et al. 2016): the ``"z"`` sites of model and guide are
  scaled by ``beta`` (``poutine.scale``), so the objective is
  ``E_q[log p(x|z)] + beta E_q[log p(z) - log q(z|x)]``; :func:`warmup_weight` anneals ``beta``
  linearly over the first epochs.
- Free bits (Kingma et al. 2016, appendix): ``E_q[log p(x|z)] - sum_j max(lam, KL_j)`` with
  ``KL_j`` the minibatch mean of the analytic ``KL(q(z_j|x) || N(0, 1))`` of latent dimension
  ``j`` (diagonal guide only). Added to the Monte Carlo ELBO as the model factor
  ``"free_bits"`` ``= sum_j (KL_nj - max(lam, KL_j))`` per datapoint, whose minibatch sum turns
  ``-sum_j KL_j`` into ``-sum_j max(lam, KL_j)`` exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ppgen.models.helpers import check_batch
from ppgen.models.likelihoods import LIKELIHOODS, make_likelihood
from ppgen.models.posteriors import POSTERIORS, encoder_features, make_posterior
from ppgen.nets import make_decoder, make_encoder

__all__ = ["VAE", "VAEConfig", "warmup_weight", "diagonal_normal_kl"]


def warmup_weight(epoch: int, warmup_epochs: int) -> float:
    """KL weight ``beta`` of epoch ``epoch`` (1-based): ``min(1, epoch / warmup_epochs)``, so it
    climbs linearly from ``1/E`` to 1 over the first ``E`` epochs; 1 throughout when ``E = 0``."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
    return 1.0 if warmup_epochs == 0 else min(1.0, epoch / warmup_epochs)


def diagonal_normal_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, scale^2) || N(0, 1))`` per dimension, same shape as ``loc``:
    ``(scale^2 + loc^2 - 1) / 2 - log scale``."""
    return 0.5 * (scale.pow(2) + loc.pow(2) - 1.0) - scale.log()


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a :class:`VAE`."""

    latent_dim: int = 20  # latent width
    hidden: tuple[int, ...] = (400,)  # hidden widths of the encoder; the decoder mirrors them
    arch: str = "mlp"  # "mlp" or "conv" (28x28 images)
    posterior: str = "diag"  # guide family: "diag", "fullcov" or "iaf" (ppgen.models.posteriors)
    likelihood: str = "bernoulli"  # "bernoulli" (0/1 data), "gaussian" or "cb" (grey levels)
    flows: int = 2  # autoregressive steps of the "iaf" posterior
    gaussian_scale: Optional[float] = None  # fixed sigma of the "gaussian" likelihood; None: learned
    kl_warmup: int = 0  # KL warm-up epochs E (beta = min(1, epoch / E)); 0: off
    free_bits: float = 0.0  # free bits lambda, nats per latent dimension (diag posterior); 0: off

    def __post_init__(self) -> None:
        if isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive integer widths, got {self.hidden!r}")
        if self.arch not in ("mlp", "conv"):
            raise ValueError(f"unknown architecture {self.arch!r}; choose 'mlp' or 'conv'")
        if self.posterior not in POSTERIORS:
            raise ValueError(f"unknown posterior {self.posterior!r}; choose one of {', '.join(POSTERIORS)}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        if isinstance(self.flows, bool) or not isinstance(self.flows, int) or self.flows < 1:
            raise ValueError(f"flows must be a positive integer, got {self.flows!r}")
        if self.gaussian_scale is not None and not (
            isinstance(self.gaussian_scale, (int, float)) and math.isfinite(self.gaussian_scale) and self.gaussian_scale > 0
        ):
            raise ValueError(f"gaussian_scale must be a positive number or None (learned), got {self.gaussian_scale!r}")
        if isinstance(self.kl_warmup, bool) or not isinstance(self.kl_warmup, int) or self.kl_warmup < 0:
            raise ValueError(f"kl_warmup must be a non-negative integer (epochs), got {self.kl_warmup!r}")
        if not (isinstance(self.free_bits, (int, float)) and math.isfinite(self.free_bits) and self.free_bits >= 0):
            raise ValueError(f"free_bits must be a non-negative number of nats, got {self.free_bits!r}")
        if self.free_bits > 0 and self.posterior != "diag":
            raise ValueError(
                f"free bits need a per-dimension KL, which only the 'diag' posterior has; got posterior={self.posterior!r}"
            )

    def build(self, x_dim: int, image_shape: tuple[int, ...]) -> "VAE":
        return VAE(
            x_dim, self.latent_dim, self.hidden, self.arch, image_shape, posterior=self.posterior,
            likelihood=self.likelihood, flows=self.flows, gaussian_scale=self.gaussian_scale,
            kl_warmup=self.kl_warmup, free_bits=self.free_bits,
        )


class VAE(nn.Module):
    """A VAE with Bernoulli likelihood and amortized diagonal-Normal guide (by default).

    :param x_dim: observation width ``D`` (flattened pixels).
    :param z_dim: latent width.
    :param hidden: hidden-layer widths of the MLP encoder (the decoder mirrors them).
    :param arch: ``"mlp"`` or ``"conv"`` (28x28 images only).
    :param image_shape: ``(C, H, W)`` of an observation, for the convolutional networks.
    :param posterior: guide family, ``"diag"``, ``"fullcov"`` or ``"iaf"``.
    :param likelihood: ``"bernoulli"``, ``"gaussian"`` or ``"cb"`` (continuous Bernoulli).
    :param flows: IAF steps (``posterior="iaf"``).
    :param gaussian_scale: fixed Gaussian sigma, or ``None`` to learn one per pixel.
    :param kl_warmup: warm-up epochs used by :meth:`objective` (0: off).
    :param free_bits: free-bits ``lambda`` in nats per latent dimension used by :meth:`objective`.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 20,
        hidden: Sequence[int] = (400,),
        arch: str = "mlp",
        image_shape: Optional[tuple[int, ...]] = None,
        posterior: str = "diag",
        likelihood: str = "bernoulli",
        flows: int = 2,
        gaussian_scale: Optional[float] = None,
        kl_warmup: int = 0,
        free_bits: float = 0.0,
    ):
        super().__init__()
        if x_dim < 1 or z_dim < 1:
            raise ValueError(f"x_dim and z_dim must be positive, got x_dim={x_dim}, z_dim={z_dim}")
        shape = tuple(image_shape) if image_shape else (1, 28, 28)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = make_encoder(x_dim, z_dim, hidden, arch, shape)
        self.decoder = make_decoder(z_dim, x_dim, hidden, arch, shape)
        self.posterior_name, self.likelihood_name = posterior, likelihood
        self.posterior = make_posterior(posterior, z_dim, self.encoder.loc.in_features, flows)
        self.likelihood = make_likelihood(likelihood, x_dim, gaussian_scale)
        if free_bits > 0 and posterior != "diag":
            raise ValueError(f"free bits need the 'diag' posterior, got posterior={posterior!r}")
        self.kl_warmup, self.free_bits = int(kl_warmup), float(free_bits)
        # Objective settings in force; changed only inside `objective` (training steps). The KL
        # weight also lives in a 0-d buffer, updated in place, so a compiled step reads it as a
        # tensor and does not recompile for every warm-up value (not saved in checkpoints).
        self._kl_weight, self._free_bits = 1.0, 0.0
        self.register_buffer("_kl_weight_t", torch.ones(()), persistent=False)

    @contextlib.contextmanager
    def objective(self, epoch: Optional[int] = None, kl_weight: Optional[float] = None,
                  free_bits: Optional[float] = None) -> Iterator[None]:
        """Within this block, :meth:`model`/:meth:`guide` score the training objective of epoch
        ``epoch`` (KL weight :func:`warmup_weight` and the configured free bits), or the explicit
        ``kl_weight``/``free_bits`` given. Outside it they score the plain ELBO."""
        beta = kl_weight if kl_weight is not None else (
            warmup_weight(epoch, self.kl_warmup) if epoch is not None else 1.0)
        lam = self.free_bits if free_bits is None else float(free_bits)
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"kl_weight must be positive (poutine.scale), got {beta!r}")
        if lam > 0 and self.posterior_name != "diag":
            raise ValueError(f"free bits need the 'diag' posterior, got {self.posterior_name!r}")
        saved = self._kl_weight, self._free_bits
        self._kl_weight, self._free_bits = float(beta), lam
        self._kl_weight_t.fill_(float(beta))
        try:
            yield
        finally:
            self._kl_weight, self._free_bits = saved
            self._kl_weight_t.fill_(saved[0])

    def _latent_scale(self):
        return poutine.scale(scale=self._kl_weight_t) if self._kl_weight != 1.0 else contextlib.nullcontext()

    def _register_guide(self) -> None:
        pyro.module("encoder", self.encoder)
        if any(True for _ in self.posterior.parameters()):
            pyro.module("posterior", self.posterior)

    def posterior_dist(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(z | x)`` for ``x (B, D)``: batch shape ``(B,)``, event shape ``(z_dim,)``."""
        return self.posterior(*encoder_features(self.encoder, x))

    def model(self, x: torch.Tensor) -> None:
        """Generative model ``p(x, z)`` for a batch ``x`` of shape ``(B, D)`` with 0/1 values."""
        check_batch(x, self.x_dim)
        pyro.module("decoder", self.decoder)
        if any(True for _ in self.likelihood.parameters()):
            pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            with self._latent_scale():
                z = pyro.sample("z", prior)
            # Data support is checked once per dataset by the training loop, not per step.
            pyro.sample("x", self.likelihood.dist(self.decoder(z)), obs=x)
            if self._free_bits > 0:
                loc, scale = self.encoder(x)
                kl = diagonal_normal_kl(loc, scale)  # (B, d)
                floor = kl.mean(0).clamp(min=self._free_bits)  # max(lam, minibatch-mean KL_j)
                with self._latent_scale():
                    pyro.factor("free_bits", (kl - floor).sum(-1))

    def guide(self, x: torch.Tensor) -> None:
        """Amortized guide ``q(z | x)`` (default ``N(loc(x), diag scale(x)^2)``) for ``x`` of shape ``(B, D)``."""
        check_batch(x, self.x_dim)
        self._register_guide()
        with pyro.plate("data", x.shape[0]):
            with self._latent_scale():
                pyro.sample("z", self.posterior_dist(x))

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear ``ValueError`` if ``x`` cannot be scored by this model."""
        check_batch(x, self.x_dim)
        self.likelihood.check_data(x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` draws of the likelihood's mean (pixel probabilities ``sigmoid(decoder(z))`` for
        the Bernoulli), ``z ~ p(z)``: shape ``(n, D)``."""
        device = next(self.parameters()).device
        return self.likelihood.mean(self.decoder(torch.randn(n, self.z_dim, device=device)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean decoded from the encoder's ``loc`` (the posterior mean for the
        Gaussian guides): shape ``(B, D)``."""
        check_batch(x, self.x_dim)
        loc, _ = self.encoder(x)
        return self.likelihood.mean(self.decoder(loc))
