"""The semi-supervised M2 model of Kingma et al. (2014) on 8x8 digits, in Pyro's idiom.

Each image has a digit class ``y`` and a style code ``z``; ``model(xs, ys=None)`` observes the
class when the labels are given and leaves it latent otherwise, inside an unsized
``pyro.plate("data")``. The guide classifies ``xs`` when no labels are given, then encodes
``z`` from the image and the class. Labelled images train with the pathwise gradient, unlabelled
ones with the class summed out exactly (ppgen's ``enum`` estimator, Pyro's ``TraceEnum_ELBO``).

    python examples/pyro_models/ss_vae.py
    python examples/pyro_models/ss_vae.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

X_DIM, Y_DIM, Z_DIM, HIDDEN = 64, 10, 4, 64


def concat(*inputs):
    """Join the last dims of inputs whose batch dims broadcast (an enumerated class has an extra
    leading dim that the image does not)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in inputs))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in inputs], dim=-1)


class SSVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_y = nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, Y_DIM))
        self.encoder_z = nn.Sequential(nn.Linear(X_DIM + Y_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 2 * Z_DIM))
        self.decoder = nn.Sequential(nn.Linear(Z_DIM + Y_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, X_DIM))

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        with pyro.plate("data"):
            prior_loc = xs.new_zeros(batch_size, Z_DIM)
            prior_scale = xs.new_ones(batch_size, Z_DIM)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            alpha_prior = xs.new_ones(batch_size, Y_DIM) / Y_DIM
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            logits = self.decoder(concat(zs, ys))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                alpha = F.softmax(self.encoder_y(xs), dim=-1)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, log_scale = self.encoder_z(concat(xs, ys)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def classify(self, xs):
        return self.encoder_y(xs).argmax(-1)


torch.manual_seed(0)
ss_vae = SSVAE()
model, guide = ss_vae.model, ss_vae.guide


def main(argv: Optional[Sequence[str]] = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ppgen_checks import run_checks

    from ppgen import SVIConfig, load_dataset, log_evidence, train_svi

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--labelled", type=int, default=200, help="training images whose class is given")
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    epochs = 3 if args.smoke else args.epochs
    data = load_dataset("digits", "static")
    one_hot = lambda y: F.one_hot(y, Y_DIM).to(data.train.dtype)  # noqa: E731
    labelled = (data.train[: args.labelled], one_hot(data.train_labels[: args.labelled]))
    unlabelled = (data.train[args.labelled:], None)
    pyro.clear_param_store()

    # The labelled split first (the class is observed: a plain VAE given y), then both splits
    # through the shared checks with the class summed out on unlabelled images.
    train_svi(model, guide, labelled, None, SVIConfig(epochs=3 * epochs, batch_size=50, lr=3e-3), progress=False)
    out = run_checks("ss_vae", model, guide, unlabelled, (data.val, None), smoke=args.smoke, epochs=epochs,
                     lr=3e-3, estimator="enum", gradient_estimators=("enum", "score-discrete"),
                     autoguide_estimator="enum", importance_k=1000 if args.smoke else 5000)
    # log p(x, y) of labelled held-out images can be no larger than log p(x) of the same images.
    n = out["evidence_n"]  # the held-out images whose log p(x) run_checks estimated
    r = log_evidence(model, guide, (data.val[:n], one_hot(data.val_labels[:n])), 500).summary()
    out["log_pxy"], out["log_pxy_se"] = r["log_px"], r["log_px_stderr"]
    out["accuracy"] = float((ss_vae.classify(data.val) == data.val_labels).float().mean())
    print(f"[ss_vae] labelled held-out log p(x, y) {out['log_pxy']:.3f} +- {out['log_pxy_se']:.3f}; "
          f"classifier accuracy {out['accuracy']:.0%}")
    return out


if __name__ == "__main__":
    main()
