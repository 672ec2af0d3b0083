"""Sample-quality metrics shared by every family: they need only samples ``(N, D)``.

- 2-D toys: modes covered and share of high-quality samples on the 8-Gaussians ring, and the
  mean exact data log-density of the samples.
- Images: Frechet distance in the feature space of a small classifier that ppgen trains on the
  same dataset and caches (the usual MNIST-family stand-in for the Inception FID of Heusel et
  al. 2017); in the same feature space, precision and recall (Kynkaenniemi et al. 2019) and the
  label balance of the samples (:mod:`ppgen.metrics_pr`); and the Parzen-window log-likelihood
  of Goodfellow et al. 2014 (bandwidth chosen on validation data).

- Any generator ``z -> x``: annealed-importance-sampling log-likelihood with Gaussian observation
  noise (Wu et al. 2017), through :func:`ppgen.infer.ais.ais_log_evidence`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ppgen.data import TOY_RADIUS, TOY_STD, DataConfig, Dataset, default_data_dir, toy_log_density
from ppgen.metrics_pr import check_2d, label_histogram, precision_recall, total_variation
from ppgen.nets import mlp

__all__ = [
    "mode_coverage", "toy_log_likelihood", "frechet_distance", "FeatureClassifier", "feature_classifier",
    "classifier_frechet_distance", "classifier_metrics", "parzen_log_likelihood", "choose_parzen_bandwidth", "parzen_evaluation",
    "RUN_SAMPLERS", "image_metrics", "run_metrics", "generator_model", "generator_ais_log_likelihood",
]


# --------------------------------------------------------------------------- 2-D toys


def mode_coverage(samples: torch.Tensor, n_sigma: float = 3.0, min_share: float = 0.01) -> tuple[int, float]:
    """Modes covered and share of high-quality samples on the 8-Gaussians ring.

    A sample is *high quality* when it lies within ``n_sigma`` standard deviations (0.1) of its
    nearest mode; a mode is *covered* when at least ``min_share`` of all samples are high-quality
    samples of that mode (the protocol of Srivastava et al. 2017, VEEGAN).

    :param samples: ``(N, 2)`` points.
    :returns: ``(modes covered out of 8, share of high-quality samples)``.
    """
    check_2d(samples, "samples", 2)
    angle = torch.arange(8, device=samples.device) * (2 * math.pi / 8)
    centres = TOY_RADIUS * torch.stack([angle.cos(), angle.sin()], 1).to(samples.dtype)
    dist, mode = torch.cdist(samples, centres).min(1)
    good = dist < n_sigma * TOY_STD
    counts = torch.bincount(mode[good], minlength=8)
    return int((counts >= min_share * samples.shape[0]).sum()), float(good.float().mean())


def toy_log_likelihood(name: str, samples: torch.Tensor) -> float:
    """Mean exact data log-density ``E_{x~model}[log p_data(x)]`` of samples ``(N, 2)`` on a toy
    with a closed-form density (8gaussians, checkerboard, rings); ``-inf`` if any sample falls
    outside the support. Higher is better, but it rewards collapse onto the densest points."""
    check_2d(samples, "samples", 2)
    return float(toy_log_density(name, samples.cpu().float()).mean())


# --------------------------------------------------------------------------- Frechet distance


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (N, F) and ``b`` (M, F):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (Dowson & Landau 1982;
    Heusel et al. 2017). Computed in float64 with symmetric eigendecompositions."""
    check_2d(a, "a")
    check_2d(b, "b", a.shape[1])
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need at least 2 points per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root_a @ s_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    return float(value.clamp(min=0))


class FeatureClassifier(nn.Module):
    """MLP classifier ``x (B, D) -> logits (B, classes)``; :meth:`features` is the last hidden layer."""

    def __init__(self, x_dim: int, classes: int = 10, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        self.x_dim = x_dim
        self.body = nn.Sequential(mlp([x_dim, *hidden]), nn.ReLU())
        self.head = nn.Linear(hidden[-1], classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        check_2d(x, "x", self.x_dim)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def feature_classifier(data: Dataset, cache_dir: Union[str, Path, None] = None, epochs: int = 5,
                       seed: int = 0, device: str = "cpu") -> tuple[FeatureClassifier, float]:
    """The feature classifier for ``data``: loaded from the cache (``weights_only=True``) or
    trained on its train split (grey levels, labels) for ``epochs`` epochs and cached.

    The cache file is ``cache_dir/classifier-<dataset>-<hash>.pt`` (default cache dir:
    ``default_data_dir()/ppgen-features``); the hash covers the training split's size, its
    checksum and the settings, so another split never reuses a stale classifier.

    :returns: ``(classifier in eval mode, test accuracy)``.
    """
    classes = int(data.train_labels.max()) + 1
    key = f"{tuple(data.train.shape)}-{float(data.train.double().sum()):.6f}-{epochs}-{seed}-{classes}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    path = Path(cache_dir or default_data_dir() / "ppgen-features") / f"classifier-{data.name}-{digest}.pt"
    net = FeatureClassifier(data.dim, classes)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["weights"])
        return net.to(device).eval(), float(state["test_accuracy"])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = data.train.to(device), data.train_labels.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        for b in range(0, len(x), 128):
            idx = order[b : b + 128]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(data.test.to(device)).argmax(1).cpu() == data.test_labels).float().mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"weights": {k: v.cpu() for k, v in net.state_dict().items()}, "test_accuracy": acc}, tmp)
    tmp.replace(path)
    return net, acc


@torch.no_grad()
def classifier_frechet_distance(classifier: FeatureClassifier, samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between ``samples`` (N, D) and ``reference`` (M, D) in the classifier's
    feature space (lower is better; 0 for identical sets)."""
    device = next(classifier.parameters()).device
    return frechet_distance(classifier.features(samples.to(device)).cpu(), classifier.features(reference.to(device)).cpu())


@torch.no_grad()
def _features_and_labels(classifier: FeatureClassifier, x: torch.Tensor, chunk: int = 4096):
    """Features ``(N, F)`` and predicted classes ``(N,)`` of ``x`` (N, D), on the classifier's device."""
    device = next(classifier.parameters()).device
    feats, labels = [], []
    for b in range(0, x.shape[0], chunk):
        f = classifier.features(x[b : b + chunk].to(device))
        feats.append(f)
        labels.append(classifier.head(f).argmax(1))
    return torch.cat(feats), torch.cat(labels)


def classifier_metrics(classifier: FeatureClassifier, samples: torch.Tensor, reference: torch.Tensor,
                       k: int = 3) -> dict:
    """Everything measured in the classifier's feature space for ``samples`` (N, D) against
    ``reference`` (M, D), features computed once on the classifier's device:

    - ``frechet_distance`` (lower is better);
    - ``precision``, ``recall`` (Kynkaenniemi et al. 2019, ``k``-NN manifolds; ``pr_k``);
    - ``label_tv``: total variation between the predicted-class shares of the samples
      (``label_hist_samples``) and of the reference (``label_hist_data``), in [0, 1].
    """
    check_2d(samples, "samples", classifier.x_dim)
    check_2d(reference, "reference", classifier.x_dim)
    f_s, y_s = _features_and_labels(classifier, samples)
    f_r, y_r = _features_and_labels(classifier, reference)
    pr = precision_recall(f_r, f_s, k)
    classes = classifier.head.out_features
    h_s, h_r = label_histogram(y_s, classes), label_histogram(y_r, classes)
    return {"frechet_distance": frechet_distance(f_s.cpu(), f_r.cpu()), "precision": pr.precision,
            "recall": pr.recall, "pr_k": k, "label_tv": total_variation(h_s, h_r),
            "label_hist_samples": h_s.tolist(), "label_hist_data": h_r.tolist()}


# --------------------------------------------------------------------------- Parzen windows


@torch.no_grad()
def parzen_log_likelihood(samples: torch.Tensor, x: torch.Tensor, sigma: float, chunk: int = 512) -> torch.Tensor:
    """Log-likelihood of each row of ``x`` (M, D) under an isotropic Gaussian kernel density with
    bandwidth ``sigma`` centred on ``samples`` (N, D): shape ``(M,)``.

    ``log p(x) = logsumexp_i N(x; s_i, sigma^2 I) - log N`` (Breuleux et al. 2011; the protocol of
    Goodfellow et al. 2014, who reported 225 +- 2 nats for their GAN on MNIST).

    **How unreliable this is.** Parzen estimates in hundreds of dimensions are poor estimators of
    log-likelihood (Theis et al. 2016, "A note on the evaluation of generative models"): with
    any feasible number of samples they are biased far below the true log-likelihood, they rank
    models differently from the true likelihood, a model that memorizes training images scores
    well, and k-means centroids of the training set can beat real generative models. The number
    depends strongly on the number of samples and on the bandwidth grid. Use it only to compare
    with published numbers computed the same way, never as evidence of a model's likelihood.
    """
    check_2d(samples, "samples")
    check_2d(x, "x", samples.shape[1])
    return _parzen_grid(samples, x, [sigma], chunk)[0]


def _parzen_grid(samples: torch.Tensor, x: torch.Tensor, sigmas: Sequence[float], chunk: int = 512) -> torch.Tensor:
    """Parzen log-likelihoods ``(len(sigmas), M)``; squared distances are computed once (float32
    matrix product, error well under 1e-3 nats for images in [0, 1]) and reused for every sigma."""
    if not all(s > 0 for s in sigmas):
        raise ValueError(f"sigma must be positive, got {list(sigmas)}")
    sig = torch.tensor(list(sigmas), dtype=torch.float64)
    x = x.to(samples.device, samples.dtype)
    s2 = samples.pow(2).sum(1)
    out = []
    for b in range(0, x.shape[0], chunk):
        xb = x[b : b + chunk]
        sq = (xb.pow(2).sum(1, keepdim=True) - 2 * xb @ samples.T + s2).clamp(min=0).double().cpu()
        out.append(torch.stack([torch.logsumexp(-0.5 * sq / v**2, 1) for v in sig]))
    d = samples.shape[1]
    norm = math.log(samples.shape[0]) + 0.5 * d * torch.log(2 * math.pi * sig**2)
    return torch.cat(out, 1) - norm[:, None]


def choose_parzen_bandwidth(samples: torch.Tensor, val: torch.Tensor,
                            sigmas: Sequence[float] = tuple(torch.logspace(-1.3, 0, 14).tolist())) -> float:
    """The ``sigma`` of the grid maximizing mean Parzen log-likelihood of validation data ``val``."""
    check_2d(samples, "samples")
    check_2d(val, "val", samples.shape[1])
    scores = _parzen_grid(samples, val, sigmas).mean(1)
    return float(sigmas[int(scores.argmax())])


def parzen_evaluation(samples: torch.Tensor, val: torch.Tensor, test: torch.Tensor) -> tuple[float, float, float]:
    """Bandwidth chosen on ``val``, then mean and standard error of the test log-likelihood.

    :returns: ``(mean log-likelihood in nats, standard error, sigma)``.
    """
    sigma = choose_parzen_bandwidth(samples, val)
    ll = parzen_log_likelihood(samples, test, sigma)
    return float(ll.mean()), float(ll.std() / math.sqrt(len(ll))), sigma


# --------------------------------------------------------------------------- whole runs


def _vae_samples(path: Path, n: int, device: str, seed: int) -> tuple[torch.Tensor, "DataConfig"]:
    from ppgen.train import load_vae

    vae, config, _ = load_vae(path, device)
    torch.manual_seed(seed)
    with torch.no_grad():
        return vae.sample(n).cpu(), config.data  # pixel probabilities (Bernoulli means)


def _gan_samples(path: Path, n: int, device: str, seed: int) -> tuple[torch.Tensor, "DataConfig"]:
    from ppgen.gan import load_gan

    generator, config = load_gan(path, device)
    return generator.sample(n, torch.Generator().manual_seed(seed)).cpu(), config.data


def _score_samples(path: Path, n: int, device: str, seed: int) -> tuple[torch.Tensor, "DataConfig"]:
    from ppgen.score import run_samples

    return run_samples(path, n, device, seed)  # annealed Langevin draws


#: run family -> function(run_path, n, device, seed) -> (samples (n, D) in [0, 1], DataConfig).
RUN_SAMPLERS = {"vae": _vae_samples, "gan": _gan_samples, "score": _score_samples}


def image_metrics(samples: torch.Tensor, data: Dataset, n_val: int = 1000, cache_dir: Union[str, Path, None] = None,
                  device: str = "cpu", k: int = 3) -> dict:
    """For ``samples`` (N, D) of grey levels against the test split: :func:`classifier_metrics`
    (Frechet distance, precision, recall, label balance), the same for the validation split as a
    yardstick (``*_val_vs_test``), and the Parzen log-likelihood of the test split (bandwidth
    chosen on ``n_val`` validation images)."""
    check_2d(samples, "samples", data.dim)
    clf, acc = feature_classifier(data, cache_dir, device=device)
    ll, se, sigma = parzen_evaluation(samples.to(device), data.val[:n_val].to(device), data.test.to(device))
    yardstick = classifier_metrics(clf, data.val, data.test, k)
    return {**classifier_metrics(clf, samples, data.test, k),
            **{f"{key}_val_vs_test": yardstick[key] for key in ("frechet_distance", "precision", "recall", "label_tv")},
            "classifier_test_accuracy": acc, "parzen_log_likelihood": ll, "parzen_stderr": se,
            "parzen_sigma": sigma, "n_samples": samples.shape[0]}


def run_metrics(path: Union[str, Path], n: int = 10000, n_val: int = 1000, cache_dir: Union[str, Path, None] = None,
                seed: int = 0, device: str = "cpu", download: bool = True, k: int = 3) -> dict:
    """Sample-quality metrics of the run in ``path`` (any family in :data:`RUN_SAMPLERS`), measured
    against the grey-level test split of the run's dataset (whatever binarization it trained on)."""
    import dataclasses

    from ppgen.runs import Run

    family = Run(path, resume=True).load_config().get("family")
    if family not in RUN_SAMPLERS:
        raise ValueError(f"{path} holds a run of family {family!r}; metrics exist for {', '.join(RUN_SAMPLERS)}")
    samples, data_config = RUN_SAMPLERS[family](Path(path), n, device, seed)
    data = dataclasses.replace(data_config, binarization="none").load(download)
    return {"family": family, "dataset": data.name, **image_metrics(samples, data, n_val, cache_dir, device, k)}


# --------------------------------------------------------------------------- AIS for generators


def generator_model(generator: nn.Module, z_dim: int, sigma: float):
    """The Pyro model ``z ~ N(0, I)``, ``x ~ N(G(z), sigma^2 I)`` of a deterministic generator
    (``G``: ``(..., z_dim) -> (..., D)``), the observation model of Wu et al. 2017."""
    import pyro
    import pyro.distributions as dist

    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(generator(z), sigma).to_event(1), obs=x)

    return model


def generator_ais_log_likelihood(generator: nn.Module, x: torch.Tensor, sigma: float, num_chains: int = 16,
                                 num_steps: int = 500, seed: int = 0, **ais_options):
    """Per-datapoint AIS estimate (a stochastic lower bound) of ``log p(x)`` for ``x`` (N, D) under
    :func:`generator_model` (Wu et al. 2017, "On the quantitative analysis of decoder-based
    generative models"). ``sigma`` is the observation noise; Wu et al. choose it on validation
    data. Extra keywords go to :func:`ppgen.infer.ais.ais_log_evidence`.

    :returns: :class:`ppgen.infer.ais.AISResult` (``log_px`` of shape ``(N,)``).
    """
    from ppgen.infer.ais import ais_log_evidence

    z_dim = getattr(generator, "z_dim", None)
    if not isinstance(z_dim, int):
        raise TypeError(f"generator must have an integer z_dim attribute, got {z_dim!r}")
    check_2d(x, "x", getattr(generator, "x_dim", None))
    for p in generator.parameters():
        p.requires_grad_(False)
    try:
        return ais_log_evidence(generator_model(generator, z_dim, sigma), x, num_chains, num_steps,
                                seed=seed, **ais_options)
    finally:
        for p in generator.parameters():
            p.requires_grad_(True)
