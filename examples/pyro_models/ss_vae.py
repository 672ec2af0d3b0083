"""The semi-supervised M2 model of Kingma et al. (2014) on 8x8 digits, in Pyro's idiom.

Each image has a digit class ``y`` and a style code ``z`` inside an unsized
``pyro.plate("data")``. ``model(xs, ys=None, labelled=None)`` takes the data in three ways:

- ``model(xs)``: an unlabelled batch; the class is latent and the guide classifies ``xs``;
- ``model(xs, ys)``: a labelled batch; the class is observed (``obs=ys``);
- ``model(xs, ys, labelled)``: a partly labelled batch, ``labelled`` a boolean ``(B,)`` mask
  (the rows of ``ys`` where it is False are ignored). The class is a latent site for every row;
  the guide gives a labelled row the point mass ``q(y | x) = [y = ys]`` and an unlabelled row its
  classifier. Summed out exactly by ``TraceEnum_ELBO`` (ppgen's ``enum`` estimator), the point
  mass keeps only the labelled class's term, so each labelled row contributes ``-L(x, y)`` and
  each unlabelled row ``-U(x)`` of Kingma et al.'s eq. 7 in one ELBO, and one ``train_svi`` run
  over a dict batch ``{"xs", "ys", "labelled"}`` trains both.

With labels present the model adds the auxiliary classification term of eq. 9,
``J^alpha = J + alpha * sum_labelled -log q(y | x)``, as ``pyro.factor("classifier", ...)`` on the
labelled rows (``alpha = ss_vae.aux_loss_multiplier``; inside the data plate, so ppgen's loop
scales it by ``N / B`` like the rest). It is a training term, not part of ``p``: score evidence
with ``poutine.block(model, hide=["classifier"])`` or on unlabelled data.

    python examples/pyro_models/ss_vae.py                      # ppgen's checks, then M2 with 10% labels
    python examples/pyro_models/ss_vae.py --smoke

From the command line, on a ``.pt`` dict ``{"xs", "ys", "labelled"}`` (the module-level
``ss_vae`` is one SSVAE; ``--train-only`` keeps labels and mask out of validation, test and
``ppgen evidence``, which then score log p(x)):

    ppgen train model examples/pyro_models/ss_vae.py:ss_vae.model --guide examples/pyro_models/ss_vae.py:ss_vae.guide \
        --data digits_10pct.pt --estimator enum --train-only ys,labelled --out runs/m2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

X_DIM, Y_DIM, Z_DIM, HIDDEN = 64, 10, 4, 64
PIN = 1e4  # logit gap of the point mass on a given label: exp(-1e4) is exactly 0 in float32/64


def concat(*inputs):
    """Join the last dims of inputs whose batch dims broadcast (an enumerated class has an extra
    leading dim that the image does not)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in inputs))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in inputs], dim=-1)


def check_labels(xs, ys, labelled):
    """Labels for a partly labelled batch, with the rows that carry none set to zero."""
    if labelled is None:
        return ys
    if ys is None:
        raise ValueError("labelled (a mask) was given without ys: pass the labels tensor too, or neither")
    if not (isinstance(labelled, torch.Tensor) and labelled.dtype == torch.bool and labelled.shape == xs.shape[:1]):
        raise TypeError(f"labelled must be a boolean tensor of shape {tuple(xs.shape[:1])} (one flag per row), "
                        f"got {labelled.dtype if isinstance(labelled, torch.Tensor) else type(labelled).__name__} "
                        f"{tuple(getattr(labelled, 'shape', ()))}")
    # Unlabelled rows may hold anything (zeros, NaN): zeroed, so no gradient passes through them.
    return torch.where(labelled.unsqueeze(-1), ys, torch.zeros_like(ys))


class SSVAE(nn.Module):
    def __init__(self, aux_loss_multiplier: float = 0.0):
        super().__init__()
        self.aux_loss_multiplier = aux_loss_multiplier  # alpha of Kingma et al.'s eq. 9
        self.encoder_y = nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, Y_DIM))
        self.encoder_z = nn.Sequential(nn.Linear(X_DIM + Y_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 2 * Z_DIM))
        self.decoder = nn.Sequential(nn.Linear(Z_DIM + Y_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, X_DIM))

    def model(self, xs, ys=None, labelled=None):
        pyro.module("ss_vae", self)
        labels = check_labels(xs, ys, labelled)
        batch_size = xs.size(0)
        with pyro.plate("data"):
            prior_loc = xs.new_zeros(batch_size, Z_DIM)
            prior_scale = xs.new_ones(batch_size, Z_DIM)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            alpha_prior = xs.new_ones(batch_size, Y_DIM) / Y_DIM
            # A partly labelled batch keeps y latent in every row: the guide pins the labelled ones.
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=labels if labelled is None else None)
            logits = self.decoder(concat(zs, ys))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=xs)
            if labels is not None and self.aux_loss_multiplier:
                # Kingma et al. (2014) eq. 9: + alpha * log q(y | x) of each labelled row.
                log_q = (F.log_softmax(self.encoder_y(xs), dim=-1) * labels).sum(-1)
                if labelled is not None:
                    log_q = torch.where(labelled, log_q, torch.zeros_like(log_q))
                pyro.factor("classifier", self.aux_loss_multiplier * log_q)

    def guide(self, xs, ys=None, labelled=None):
        labels = check_labels(xs, ys, labelled)
        with pyro.plate("data"):
            if ys is None or labelled is not None:
                logits = self.encoder_y(xs)
                if labelled is not None:  # q(y | x) of a labelled row: a point mass on its label
                    logits = torch.where(labelled.unsqueeze(-1), (labels - 1) * PIN, logits)
                ys = pyro.sample("y", dist.OneHotCategorical(logits=logits))
            loc, log_scale = self.encoder_z(concat(xs, ys)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def classify(self, xs):
        return self.encoder_y(xs).argmax(-1)


torch.manual_seed(0)
ss_vae = SSVAE()
model, guide = ss_vae.model, ss_vae.guide


def partly_labelled(xs, labels, fraction: float, seed: int = 0) -> dict:
    """The dict batch of a data set whose first ``round(fraction * N)`` rows of a fixed random
    order keep their labels: ``{"xs", "ys" (one-hot), "labelled" (bool)}``."""
    n = len(xs)
    labelled = torch.zeros(n, dtype=torch.bool)
    labelled[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(fraction * n)]] = True
    return {"xs": xs, "ys": F.one_hot(labels, Y_DIM).to(xs.dtype), "labelled": labelled.to(xs.device)}


def semi_supervised(data, fraction: float, alpha: float, epochs: int, seed: int = 0, lr: float = 3e-3) -> dict:
    """Train a fresh M2 on ``data.train`` with ``fraction`` of its labels (``alpha`` weighting the
    classifier term) in one ``train_svi`` run, then its held-out accuracy (``data.val``)."""
    from ppgen import SVIConfig, train_svi
    from ppgen.models.m2 import cluster_accuracy

    pyro.clear_param_store()
    torch.manual_seed(seed)
    net = SSVAE(aux_loss_multiplier=alpha)
    batch = partly_labelled(data.train, data.train_labels, fraction, seed)
    start = time.perf_counter()
    result = train_svi(net.model, net.guide, batch, {"xs": data.val},
                       SVIConfig(estimator="enum", epochs=epochs, batch_size=50, lr=lr, seed=seed), progress=False)
    with torch.no_grad():
        pred = net.classify(data.val)
    return {"labels_fraction": fraction, "alpha": alpha, "epochs": epochs, "seconds": time.perf_counter() - start,
            "val_elbo": result.val_elbo, "accuracy": float((pred == data.val_labels).float().mean()),
            "cluster_accuracy": cluster_accuracy(pred, data.val_labels, Y_DIM)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ppgen_checks import run_checks

    from ppgen import SVIConfig, load_dataset, log_evidence, train_svi

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--labelled", type=int, default=200, help="training images whose class is given (the checks)")
    p.add_argument("--labels-fraction", type=float, default=0.1, help="share of labelled images (semi-supervised run)")
    p.add_argument("--alpha", type=float, default=20.0, help="weight of the classifier term (eq. 9)")
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    epochs = 3 if args.smoke else args.epochs
    data = load_dataset("digits", "static")
    one_hot = lambda y: F.one_hot(y, Y_DIM).to(data.train.dtype)  # noqa: E731
    labelled = (data.train[: args.labelled], one_hot(data.train_labels[: args.labelled]))
    unlabelled = (data.train[args.labelled:], None)
    pyro.clear_param_store()

    # ppgen's checks on the two splits in turn: the labelled split first (the class is observed:
    # a plain VAE given y), then the unlabelled one with the class summed out.
    train_svi(model, guide, labelled, None, SVIConfig(epochs=3 * epochs, batch_size=50, lr=3e-3), progress=False)
    out = run_checks("ss_vae", model, guide, unlabelled, (data.val, None), smoke=args.smoke, epochs=epochs,
                     lr=3e-3, estimator="enum", gradient_estimators=("enum", "score-discrete"),
                     autoguide_estimator="enum", importance_k=1000 if args.smoke else 5000)
    # log p(x, y) of labelled held-out images can be no larger than log p(x) of the same images.
    n = out["evidence_n"]  # the held-out images whose log p(x) run_checks estimated
    r = log_evidence(poutine.block(model, hide=["classifier"]), guide, (data.val[:n], one_hot(data.val_labels[:n])),
                     500).summary()
    out["log_pxy"], out["log_pxy_se"] = r["log_px"], r["log_px_stderr"]
    out["accuracy"] = float((ss_vae.classify(data.val) == data.val_labels).float().mean())
    print(f"[ss_vae] labelled held-out log p(x, y) {out['log_pxy']:.3f} +- {out['log_pxy_se']:.3f}; "
          f"classifier accuracy {out['accuracy']:.0%}")

    # Semi-supervised M2 in one run: labelled and unlabelled rows mixed in every batch, with the
    # classifier term, against the same run without labels.
    if not args.smoke:
        for fraction, alpha in ((args.labels_fraction, args.alpha), (0.0, 0.0)):
            r = semi_supervised(data, fraction, alpha, epochs)
            out[f"m2_{fraction:g}"] = r
            print(f"[ss_vae] M2, {fraction:.0%} labels, alpha {alpha:g}, {epochs} epochs ({r['seconds']:.0f} s): "
                  f"held-out accuracy {r['accuracy']:.1%} (cluster-matched {r['cluster_accuracy']:.1%}), "
                  f"ELBO {r['val_elbo']:.2f}")
    return out


if __name__ == "__main__":
    main()
