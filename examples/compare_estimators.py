"""Compare gradient estimators on one VAE: gradient variance / SNR at fixed parameters, then
validation ELBO after the same number of SVI steps.

Estimators come from ``ppgen.infer.estimators.ESTIMATORS``: ``reparam`` (Kingma & Welling
2014), ``stl`` (Roeder et al. 2017), ``score`` (REINFORCE, Williams 1992) and
``score-baseline`` (with a decaying-average baseline, Mnih & Gregor 2014).

    python examples/compare_estimators.py --epochs 10
    python examples/compare_estimators.py --smoke
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import pyro
import torch


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ppgen.data import DataConfig, binarize
    from ppgen.infer.svi import SVIConfig, train_svi
    from ppgen.infer.variance import gradient_stats
    from ppgen.models.vae import VAEConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", default="reparam,score,stl,score-baseline", help="comma-separated names")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--draws", type=int, default=50, help="gradient draws per estimator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few seconds: the first two estimators, 1 epoch on 320 digits")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.estimators.split(",") if n.strip()]
    if args.smoke:
        names, args.epochs, args.draws = names[:2] if len(names) > 1 else names, 1, 15

    data = DataConfig("digits").load(download=False)
    x = binarize(data.val[:64], torch.Generator().manual_seed(args.seed))
    train = data.train[:320] if args.smoke else data.train

    def fresh():
        pyro.clear_param_store()
        torch.manual_seed(args.seed)
        return VAEConfig(latent_dim=10, hidden=(128,)).build(data.dim, data.image_shape)

    vae = fresh()  # 1. gradient noise of each estimator at the same (initial) parameters
    stats = gradient_stats(vae.model, vae.guide, x, names, num_draws=args.draws, reference_draws=2 * args.draws,
                           warmup=10, seed=args.seed)
    results = {}
    for name in names:  # 2. the same VAE trained with each estimator
        vae = fresh()
        r = train_svi(vae.model, vae.guide, train, data.val,
                      SVIConfig(estimator=name, epochs=args.epochs, batch_size=64, seed=args.seed),
                      transform=binarize, progress=False)
        enc = stats.row(name, "encoder")
        results[name] = {"encoder_variance": enc["variance"], "encoder_snr": enc["snr"],
                         "decoder_snr": stats.row(name, "decoder")["snr"], "val_elbo": r.val_elbo}
    print(f"| estimator | encoder grad variance | encoder SNR | decoder SNR | val ELBO after {args.epochs} epochs |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['encoder_variance']:.3g} | {r['encoder_snr']:.3g} | {r['decoder_snr']:.3g} | {r['val_elbo']:.2f} |")
    return results


if __name__ == "__main__":
    main()
