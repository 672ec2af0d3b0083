"""Train a GAN from Python on the 8-Gaussians ring and count the modes it covers.

Uses ppgen's adversarial loop (Goodfellow et al. 2014; non-saturating or other losses from
``ppgen.gan.LOSSES``) on MLP generator and discriminator, then the VEEGAN protocol
(Srivastava et al. 2017): modes covered out of 8 and the share of high-quality samples.

    python examples/gan_from_python.py --epochs 30 --loss ns
    python examples/gan_from_python.py --smoke
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ppgen.gan import LoopConfig, make_generator, train_toy_gan
    from ppgen.metrics import mode_coverage, toy_log_likelihood

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", default="ns", help="GAN objective (ppgen.gan.LOSSES)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n", type=int, default=10000, help="training points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="optional PNG of data and samples")
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.epochs = 2000, 3

    torch.manual_seed(args.seed)  # reference: the same generator untrained
    with torch.no_grad():
        untrained = make_generator(2, 2, (128, 128), sigmoid=False)(torch.randn(5000, 2))
    config = LoopConfig(args.loss, epochs=args.epochs, batch_size=128, lr_g=1e-3, lr_d=1e-3, seed=args.seed)
    generator, discriminator, result = train_toy_gan("8gaussians", args.n, config, latent_dim=2, hidden=(128, 128))
    with torch.no_grad():
        samples = generator(torch.randn(5000, 2, generator=torch.Generator().manual_seed(args.seed)))
    modes, quality = mode_coverage(samples)
    density = toy_log_likelihood("8gaussians", samples)
    last = result.history[-1]
    print(f"{args.epochs} epochs: loss_D {last['loss_D']:.3f}, loss_G {last['loss_G']:.3f}, "
          f"D(x) {last['D_real']:.2f}, D(G(z)) {last['D_fake']:.2f}")
    print(f"modes covered {modes}/8, high-quality samples {quality:.0%}, mean data log-density {density:.2f}")
    base_modes, base_quality = mode_coverage(untrained)
    base_density = toy_log_likelihood("8gaussians", untrained)
    print(f"untrained generator: modes {base_modes}/8, high-quality {base_quality:.0%}, log-density {base_density:.2f}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ppgen.data import toy_sample

        plt.scatter(*toy_sample("8gaussians", 2000, 1).T, s=2, c="grey", label="data")
        plt.scatter(*samples[:2000].T, s=2, c="tab:red", label="GAN")
        plt.legend()
        plt.gca().set_aspect("equal")
        plt.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    return {"modes": modes, "quality": quality, "log_density": density, "untrained_log_density": base_density,
            "untrained_quality": base_quality, "history": result.history}


if __name__ == "__main__":
    main()
