"""Score models: objectives, networks, samplers, data-set noise ladders, the training loop.

- :mod:`ppgen.score.objectives`: implicit, sliced and denoising score matching (the losses).
- :mod:`ppgen.score.networks`: MLP and U-Net score networks, ``s(x, sigma) = s(x) / sigma``.
- :mod:`ppgen.score.sampling`: Langevin and annealed Langevin dynamics; a Gaussian mixture with
  exact scores as a known answer.
- :mod:`ppgen.score.ladder`: Song & Ermon (2020)'s rules for the noise ladder and step size.
- :mod:`ppgen.score.config`: :class:`ScoreConfig`, its validation, the objective and net it builds.
- :mod:`ppgen.score.loop`: :func:`train_score` and :func:`load_score` (EMA, checkpoints, resume).
- :mod:`ppgen.score.samples`: samples, figures and the ``ppgen metrics`` sampler of a run.

Everything public is re-exported here: ``from ppgen.score import ScoreConfig, train_score``.
"""

from ppgen.score.ladder import (
    NoiseLadder,
    data_noise_ladder,
    langevin_step_size,
    langevin_variance_ratio,
    level_overlap,
    max_pairwise_distance,
    overlap_ratio,
)
from ppgen.score.loop import ScoreConfig, ScoreRun, ladder_record, load_data, load_score, resolve_ladder, train_score
from ppgen.score.networks import ScoreNet, UNetScore
from ppgen.score.objectives import (
    OBJECTIVES,
    dae_loss,
    dae_score,
    dsm_loss,
    geometric_sigmas,
    ism_loss,
    ncsn_loss,
    ssm_loss,
)
from ppgen.score.samples import plot_toy_field, run_samples, sample_run, sample_score, write_figures
from ppgen.score.sampling import GaussianMixture, LangevinResult, annealed_langevin, denoise_step, langevin

__all__ = [
    "GaussianMixture", "LangevinResult", "NoiseLadder", "OBJECTIVES", "ScoreConfig", "ScoreNet", "ScoreRun", "UNetScore",
    "annealed_langevin", "dae_loss", "denoise_step", "dae_score", "data_noise_ladder", "dsm_loss", "geometric_sigmas", "ism_loss",
    "ladder_record", "langevin", "langevin_step_size", "langevin_variance_ratio", "level_overlap", "load_data",
    "load_score", "max_pairwise_distance", "ncsn_loss", "overlap_ratio", "plot_toy_field", "resolve_ladder",
    "run_samples", "sample_run", "sample_score", "ssm_loss", "train_score", "write_figures",
]
