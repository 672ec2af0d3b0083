"""Generative adversarial networks: objectives, networks, the adversarial loop and its runs.

- :mod:`ppgen.gan.objectives`: GAN losses by name (minimax, ns, hinge), the R1 penalty, and the
  optimal discriminator as a known answer.
- :mod:`ppgen.gan.networks`: the decoder as generator, the encoder trunk with a scalar head as
  discriminator, spectral normalization.
- :mod:`ppgen.gan.loop`: :class:`LoopConfig` and :func:`adversarial_loop` (stabilizers,
  checkpoints, resume), :class:`GANConfig`, :func:`train_gan`, :func:`load_gan`, toys.

Everything public is re-exported here: ``from ppgen.gan import GANConfig, train_gan``.
"""

from ppgen.gan.loop import GANConfig, GANResult, LoopConfig, adversarial_loop, load_gan, train_gan, train_toy_gan
from ppgen.gan.networks import Discriminator, Generator, make_discriminator, make_generator, spectral_normalize
from ppgen.gan.objectives import (
    LOSSES,
    GANLoss,
    get_loss,
    optimal_discriminator,
    optimal_discriminator_gap,
    r1_penalty,
)

__all__ = [
    "Discriminator", "GANConfig", "GANLoss", "GANResult", "Generator", "LOSSES", "LoopConfig", "adversarial_loop",
    "get_loss", "load_gan", "make_discriminator", "make_generator", "optimal_discriminator",
    "optimal_discriminator_gap", "r1_penalty", "spectral_normalize", "train_gan", "train_toy_gan",
]
