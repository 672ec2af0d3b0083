import math
from importlib import resources

import numpy as np
import pytest
import torch

from ppgen.data import (
    DEBIAN_FASHION_MNIST,
    DataConfig,
    DataNotFoundError,
    TOYS,
    check_binary,
    load_dataset,
    toy_log_density,
    toy_sample,
)


def test_digits_splits_partition_the_data_and_are_fixed_by_seed():
    a = load_dataset("digits", binarization="none")
    b = load_dataset("digits", binarization="none")
    assert (len(a.train), len(a.val), len(a.test)) == (1257, 270, 270)
    assert a.dim == 64 and a.image_shape == (1, 8, 8)
    assert torch.equal(a.train, b.train) and torch.equal(a.val_labels, b.val_labels)
    assert float(a.train.min()) == 0.0 and float(a.train.max()) == 1.0
    assert not torch.equal(load_dataset("digits", binarization="none", split_seed=1).train, a.train)
    # the three splits hold every embedded image exactly once
    with resources.files("ppgen").joinpath("_data/digits.npz").open("rb") as f:
        raw = torch.from_numpy(np.load(f)["images"].reshape(-1, 64).astype(np.float32) / 16)
    key = torch.randn(64)
    together = torch.cat([a.train, a.val, a.test])
    assert torch.allclose((together @ key).sort().values, (raw @ key).sort().values)


def test_binarizations():
    dyn = load_dataset("digits", "dynamic")
    static = load_dataset("digits", "static")
    check_binary(static.train)
    check_binary(dyn.val)
    check_binary(dyn.test)
    assert dyn.dynamic and not static.dynamic
    assert ((dyn.train > 0) & (dyn.train < 1)).any()  # grey levels kept for per-batch draws
    assert torch.equal(static.val, load_dataset("digits", "static").val)  # one seeded draw
    # a binarized pixel's mean is its grey level
    grey = load_dataset("digits", "none").train
    draws = torch.stack([torch.bernoulli(grey) for _ in range(200)]).mean(0)
    assert (draws - grey).abs().mean() < 0.03


def test_check_binary_names_the_fix():
    with pytest.raises(ValueError, match="binarize"):
        check_binary(torch.tensor([[0.0, 0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        check_binary(torch.tensor([[0.0, float("nan")]]))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="dynamic"):
        load_dataset("digits", binarization="otsu")
    with pytest.raises(ValueError, match="known datasets"):
        DataConfig(name="nope")
    with pytest.raises(ValueError, match="8gaussians"):
        toy_sample("spiral", 10)


def test_missing_files_give_three_ways_to_get_them(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("mnist", data_dir=str(tmp_path), download=False)
    msg = str(err.value)
    assert "--data-dir" in msg and "internet" in msg and "apt-get install dataset-fashion-mnist" in msg


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    d = load_dataset("fashion-mnist", "static", data_dir=str(tmp_path), download=False)
    assert (len(d.train), len(d.val), len(d.test), d.dim) == (50000, 10000, 10000, 784)
    assert sorted(d.test_labels.unique().tolist()) == list(range(10))
    check_binary(d.train)


@pytest.mark.parametrize("name", [n for n, (_, f) in TOYS.items() if f is not None])
def test_toy_densities_integrate_to_one(name):
    step = 0.02
    g = torch.arange(-3.5, 3.5, step) + step / 2
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    mass = toy_log_density(name, pts).exp().sum() * step**2
    assert abs(float(mass) - 1.0) < 0.01


@pytest.mark.parametrize("name", [n for n, (_, f) in TOYS.items() if f is not None])
def test_toy_samples_come_from_their_density(name):
    # Samples must land where the density is high: their mean log density is the negative
    # entropy, far above the log density of uniform points on the same box.
    x = toy_sample(name, 4000, seed=1)
    uniform = torch.rand(4000, 2) * 7 - 3.5
    on = toy_log_density(name, x)
    assert torch.isfinite(on).all()
    assert on.mean() > toy_log_density(name, uniform).clamp(min=-50).mean() + 1.0


def test_moons_and_shapes():
    x = toy_sample("moons", 1000)
    assert x.shape == (1000, 2)
    assert -1.5 < float(x[:, 0].min()) and float(x[:, 0].max()) < 2.5
    with pytest.raises(ValueError, match="closed-form"):
        toy_log_density("moons", x)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        toy_log_density("8gaussians", torch.zeros(3, 3))
    assert math.isclose(float(toy_log_density("checkerboard", torch.tensor([[0.5, 0.5]]))), -math.log(8), abs_tol=1e-6)
    assert float(toy_log_density("checkerboard", torch.tensor([[0.5, 1.5]]))) == -math.inf
