"""ppgen: deep generative models on Pyro and PyTorch.

Declare latent-variable models as Pyro model/guide pairs and train them by SVI with the gradient
estimator of your choice; measure estimators; estimate evidence; train the same networks as a
GAN and as a score model.
"""

from ppgen.data import DataConfig, Dataset, binarize, load_dataset, toy_log_density, toy_sample
from ppgen.infer.estimators import ESTIMATORS, get_estimator, make_elbo, prepare_guide
from ppgen.infer.svi import SVIConfig, SVIResult, evaluate_elbo, train_svi
from ppgen.models.vae import VAE, VAEConfig
from ppgen.runs import Run
from ppgen.train import VAERunConfig, load_vae, train_vae

from ppgen.ema import EMA
from ppgen.infer.ais import ais_log_evidence, bdmc, guide_start
from ppgen.infer.trusted import inference_gaps, trusted_evidence
from ppgen.metrics_pr import precision_recall
from ppgen.infer.evidence import EvidenceResult, log_evidence
from ppgen.infer.nested_evidence import JointEvidenceResult, joint_log_evidence
from ppgen.models.linear_gaussian import LinearGaussian

__version__ = "0.1.0"

__all__ = [
    "DataConfig",
    "Dataset",
    "ESTIMATORS",
    "Run",
    "SVIConfig",
    "SVIResult",
    "VAE",
    "VAEConfig",
    "VAERunConfig",
    "binarize",
    "evaluate_elbo",
    "get_estimator",
    "load_dataset",
    "load_vae",
    "make_elbo",
    "prepare_guide",
    "toy_log_density",
    "toy_sample",
    "train_svi",
    "train_vae",
]
__all__ += ["EvidenceResult", "LinearGaussian", "ais_log_evidence", "bdmc", "log_evidence"]
__all__ += ["JointEvidenceResult", "joint_log_evidence"]
__all__ += ["EMA", "guide_start", "inference_gaps", "precision_recall", "trusted_evidence"]

from ppgen.infer.autoguide import AmortizedGuide  # noqa: E402

__all__ += ["AmortizedGuide"]
