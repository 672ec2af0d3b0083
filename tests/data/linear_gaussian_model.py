"""A linear-Gaussian model and its guide written in Pyro's idiom, for ``ppgen train model``.

    z ~ N(0, I_d),   x | z ~ N(W z + b, s^2 I_D)     (probabilistic PCA; Tipping & Bishop 1999)

Its evidence is exact at any parameters: ``p(x) = N(x; b, W W^T + s^2 I_D)``
(:func:`exact_log_evidence`), so an importance-sampled ``log p(x)`` of a trained run can be checked
against it. The guide is amortized and linear, ``q(z | x) = N(A x + c, L L^T)``: the exact posterior
is in its family. Used by tests/test_user_models_cli.py as

    ppgen train model tests/data/linear_gaussian_model.py:model \\
        --guide tests/data/linear_gaussian_model.py:guide --data points.npy --out RUN
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

X_DIM, Z_DIM = 4, 2


def model(x):
    W = pyro.param("W", lambda: 0.1 * torch.randn(X_DIM, Z_DIM, dtype=x.dtype))
    b = pyro.param("b", lambda: torch.zeros(X_DIM, dtype=x.dtype))
    log_s = pyro.param("log_s", lambda: torch.zeros((), dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + b, log_s.exp()).to_event(1), obs=x)


def guide(x):
    A = pyro.param("A", lambda: torch.zeros(Z_DIM, X_DIM, dtype=x.dtype))
    c = pyro.param("c", lambda: torch.zeros(Z_DIM, dtype=x.dtype))
    L = pyro.param("L", lambda: torch.eye(Z_DIM, dtype=x.dtype), constraint=constraints.lower_cholesky)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.MultivariateNormal(x @ A.T + c, scale_tril=L))


def exact_log_evidence(x, W, b, log_s):
    """Exact ``log p(x_n)`` at parameters ``W (D, d)``, ``b (D,)``, ``log_s ()``; shape ``(N,)``."""
    cov = W @ W.T + torch.exp(2 * log_s) * torch.eye(X_DIM, dtype=W.dtype)
    return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)
