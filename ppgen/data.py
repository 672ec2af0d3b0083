"""Datasets: the embedded 8x8 digits, the torchvision MNIST family, and 2-D toy sets.

Image data is returned as float tensors of shape ``(N, D)`` with values in ``[0, 1]``
(``D = C * H * W``); :attr:`Dataset.image_shape` restores the image layout.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

__all__ = [
    "DataConfig",
    "Dataset",
    "DataNotFoundError",
    "DATASETS",
    "BINARIZATIONS",
    "TOYS",
    "load_dataset",
    "binarize",
    "check_binary",
    "toy_sample",
    "toy_log_density",
]

#: Folder where Debian's ``dataset-fashion-mnist`` package puts the idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

BINARIZATIONS = ("dynamic", "static", "none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data a run trains on."""

    name: str = "digits"  # dataset name (DATASETS)
    binarization: str = "dynamic"  # "dynamic", "static" or "none"
    data_dir: Optional[str] = None  # folder with torchvision's dataset folders
    split_seed: int = 0  # seed of the train/validation split and of static binarization

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; known datasets: {', '.join(DATASETS)}")
        if self.binarization not in BINARIZATIONS:
            raise ValueError(
                f"unknown binarization {self.binarization!r}; choose one of {', '.join(BINARIZATIONS)}"
            )

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one image, known without loading the data."""
        return IMAGE_SHAPES[self.name]

    def load(self, download: bool = True) -> "Dataset":
        return load_dataset(self.name, self.binarization, self.data_dir, download, self.split_seed)


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing and could not be downloaded."""


class Dataset(NamedTuple):
    """Train / validation / test splits of one dataset, already on the CPU.

    ``train`` holds grey levels when ``dynamic`` is true: the training loop draws a fresh
    binarization per batch with :func:`binarize`. Validation and test splits are always ready to
    score (binarized once with a fixed seed when a binarization was asked for).
    """

    name: str
    train: torch.Tensor  # (N_train, D) float in [0, 1]
    val: torch.Tensor  # (N_val, D)
    test: torch.Tensor  # (N_test, D)
    train_labels: torch.Tensor  # (N_train,) int64
    val_labels: torch.Tensor
    test_labels: torch.Tensor
    image_shape: tuple[int, ...]  # (C, H, W)
    dynamic: bool  # binarize each training batch afresh

    @property
    def dim(self) -> int:
        return self.train.shape[1]


def binarize(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with success probability equal to its grey level.

    Drawn as ``u < x`` with ``u ~ U[0, 1)``: the same distribution as ``torch.bernoulli``, about
    3.5x faster on CPU (0.25 against 0.91 ms for a 128 x 784 batch), which is a sixth of a VAE step."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (u < x).to(x.dtype)


def check_binary(x: torch.Tensor, what: str = "data") -> None:
    """Raise a ``ValueError`` unless every value of ``x`` is 0 or 1 (Bernoulli support)."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf values; clean the data before training.")
    bad = (x != 0) & (x != 1)
    if bad.any():
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(
            f"{what} has values other than 0 and 1 (range [{lo:g}, {hi:g}]), but a Bernoulli "
            "likelihood needs binary data. Binarize it (--binarize dynamic or static) or choose "
            "a likelihood for continuous data."
        )


def _split(n: int, n_val: int, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _digits(data_dir: Optional[str], download: bool, seed: int) -> tuple:
    """UCI optical handwritten digits (1,797 images of 8x8, grey levels 0..16), embedded."""
    with resources.files("ppgen").joinpath("_data/digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 16.0)
    y = torch.from_numpy(labels.astype(np.int64))
    tr, va, te = _split(len(x), 270, 270, seed)
    return (x[tr], x[va], x[te], y[tr], y[va], y[te]), (1, 8, 8)


_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


def default_data_dir() -> Path:
    """``$PPGEN_DATA`` if set, else ``~/.cache/ppgen/data``."""
    return Path(os.environ.get("PPGEN_DATA", Path.home() / ".cache" / "ppgen" / "data"))


def _copy_debian_fashion_mnist(root: Path) -> bool:
    """Unpack Debian's Fashion-MNIST idx files into torchvision's folder layout under ``root``."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        return False
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for part in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        kind = "idx3" if "images" in part else "idx1"
        src = DEBIAN_FASHION_MNIST / f"{part}-{kind}-ubyte.gz"
        if not src.exists():
            return False
        dst = raw / f"{part}-{kind}-ubyte"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, dst)
    return True


def _torchvision(name: str) -> Callable:
    def load(data_dir: Optional[str], download: bool, seed: int) -> tuple:
        from torchvision import datasets

        cls = getattr(datasets, _TORCHVISION[name])
        root = Path(data_dir) if data_dir else default_data_dir()

        def open_split(train: bool):
            try:
                return cls(str(root), train=train, download=False)
            except RuntimeError:
                pass
            if name == "fashion-mnist" and _copy_debian_fashion_mnist(root):
                return cls(str(root), train=train, download=False)
            if download:
                try:
                    return cls(str(root), train=train, download=True)
                except Exception as err:  # no network, mirror down, disk full ...
                    reason = f"the download failed ({type(err).__name__}: {err})"
            else:
                reason = "downloads are off"
            raise DataNotFoundError(
                f"dataset {name!r} was not found under {root} and {reason}. Get it one of three "
                f"ways: (1) run once with internet access so torchvision downloads it; "
                f"(2) pass --data-dir pointing at a folder that holds {cls.__name__}/raw/ with "
                f"the idx files; (3) for fashion-mnist on Debian/Ubuntu, "
                f"`apt-get install dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST})."
            )

        train, test = open_split(True), open_split(False)
        x = train.data.reshape(len(train.data), -1).float() / 255.0
        y = train.targets.long()
        tr, va, _ = _split(len(x), 10000, 0, seed)
        xt = test.data.reshape(len(test.data), -1).float() / 255.0
        return (x[tr], x[va], xt, y[tr], y[va], test.targets.long()), (1, 28, 28)

    return load


IMAGE_SHAPES = {"digits": (1, 8, 8), **{k: (1, 28, 28) for k in _TORCHVISION}}

#: Registry: dataset name -> loader(data_dir, download, split_seed) -> (splits, image_shape).
DATASETS: dict[str, Callable] = {"digits": _digits, **{k: _torchvision(k) for k in _TORCHVISION}}


def load_dataset(
    name: str = "digits",
    binarization: str = "dynamic",
    data_dir: Optional[str] = None,
    download: bool = True,
    split_seed: int = 0,
) -> Dataset:
    """Load a dataset as train / validation / test tensors.

    :param name: one of :data:`DATASETS` (``digits`` needs no download).
    :param binarization: ``dynamic`` (fresh Bernoulli draw per training batch, the usual protocol
        for MNIST likelihoods; evaluation splits get one seeded draw), ``static`` (one seeded
        draw for every split) or ``none`` (grey levels in [0, 1]).
    :param data_dir: folder holding torchvision's dataset folders; defaults to
        :func:`default_data_dir`.
    :param download: let torchvision download missing files.
    :param split_seed: seed of the train/validation split (and of static binarization).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"unknown binarization {binarization!r}; choose one of {', '.join(BINARIZATIONS)}"
        )
    (xtr, xva, xte, ytr, yva, yte), shape = DATASETS[name](data_dir, download, split_seed)
    if binarization != "none":
        g = torch.Generator().manual_seed(split_seed + 1)
        xva, xte = binarize(xva, g), binarize(xte, g)
        if binarization == "static":
            xtr = binarize(xtr, g)
    return Dataset(name, xtr, xva, xte, ytr, yva, yte, shape, binarization == "dynamic")


# --------------------------------------------------------------------------- 2-D toy sets


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=g)
    return _ring_centres()[k] + TOY_STD * torch.randn(n, 2, generator=g)


TOY_STD = 0.1  # standard deviation of each 8-Gaussians component
TOY_RADIUS = 2.0  # radius of the 8-Gaussians ring
RING_RADII = (1.0, 2.0)  # concentric rings
RING_STD = 0.08


def _ring_centres() -> torch.Tensor:
    angle = torch.arange(8) * (2 * math.pi / 8)
    return TOY_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    upper = torch.rand(n, generator=g) < 0.5
    t = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    return torch.stack([x, y], 1) + 0.05 * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # Uniform on the 8 unit squares of [-2, 2]^2 whose integer corners have even sum.
    cells = torch.tensor([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0])
    k = torch.randint(0, len(cells), (n,), generator=g)
    return cells[k].float() + torch.rand(n, 2, generator=g)


def _rings(n: int, g: torch.Generator) -> torch.Tensor:
    radii = torch.tensor(RING_RADII)
    r = radii[torch.randint(0, len(radii), (n,), generator=g)]
    r = r + RING_STD * torch.randn(n, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    return torch.stack([r * angle.cos(), r * angle.sin()], 1)


def _logdens_gaussians(x: torch.Tensor) -> torch.Tensor:
    d2 = ((x[:, None, :] - _ring_centres()[None]) ** 2).sum(-1)
    comp = -0.5 * d2 / TOY_STD**2 - math.log(2 * math.pi * TOY_STD**2)
    return torch.logsumexp(comp, 1) - math.log(8)


def _logdens_checkerboard(x: torch.Tensor) -> torch.Tensor:
    inside = (x.abs() <= 2).all(1) & ((x.floor().sum(1) % 2) == 0)
    return torch.where(inside, torch.tensor(-math.log(8.0)), torch.tensor(-math.inf))


def _logdens_rings(x: torch.Tensor) -> torch.Tensor:
    # Radius ~ N(r_i, RING_STD) and a uniform angle give density N(rho; r_i, s) / (2 pi rho);
    # the mass a Gaussian puts below radius 0 (< 1e-30 here) is ignored.
    rho = x.norm(dim=1, keepdim=True)
    radii = torch.tensor(RING_RADII)
    comp = -0.5 * ((rho - radii) / RING_STD) ** 2 - math.log(RING_STD * math.sqrt(2 * math.pi))
    return torch.logsumexp(comp, 1) - math.log(len(RING_RADII)) - torch.log(2 * math.pi * rho[:, 0])


#: name -> (sampler(n, generator), exact log density or None)
TOYS: dict[str, tuple[Callable, Optional[Callable]]] = {
    "8gaussians": (_eight_gaussians, _logdens_gaussians),
    "moons": (_moons, None),
    "checkerboard": (_checkerboard, _logdens_checkerboard),
    "rings": (_rings, _logdens_rings),
}


def toy_sample(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points, shape ``(n, 2)``, from the 2-D toy distribution ``name`` (see :data:`TOYS`)."""
    if name not in TOYS:
        raise ValueError(f"unknown toy dataset {name!r}; known toys: {', '.join(TOYS)}")
    if n < 1:
        raise ValueError(f"n must be a positive number of points, got {n}")
    return TOYS[name][0](n, torch.Generator().manual_seed(seed))


def toy_log_density(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log density, shape ``(n,)``, of the toy ``name`` at points ``x`` of shape ``(n, 2)``."""
    if name not in TOYS:
        raise ValueError(f"unknown toy dataset {name!r}; known toys: {', '.join(TOYS)}")
    fn = TOYS[name][1]
    if fn is None:
        raise ValueError(f"toy {name!r} has no closed-form density")
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (n, 2), got {tuple(x.shape)}")
    return fn(x)
