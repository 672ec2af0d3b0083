"""ProdLDA (Srivastava & Sutton 2017), a neural topic model, on synthetic word counts, in Pyro's idiom.

Each document has topic proportions ``theta = softmax(logtheta)`` with a logistic-normal prior
(the Laplace approximation of a Dirichlet), and its bag of words is multinomial with
probabilities from a product of experts over topics; the guide is an encoder with BatchNorm on
the mean and log-variance of ``logtheta``, as the paper's encoder has, and the documents sit in
``pyro.plate("documents", ...)``. The corpus is drawn from a small LDA-like generator (a few
sparse topics over a 100-word vocabulary), so it runs without downloads.

    python examples/pyro_models/prodlda.py
    python examples/pyro_models/prodlda.py --smoke
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

VOCAB, TOPICS, HIDDEN, DROPOUT = 100, 5, 64, 0.2


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, num_topics: int, hidden: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(vocab_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_mu = nn.Linear(hidden, num_topics)
        self.fc_lv = nn.Linear(hidden, num_topics)
        # Batch normalisation without a learned affine part keeps the posterior means and
        # variances on a common scale across the batch (the paper's remedy for component collapse).
        self.bn_mu = nn.BatchNorm1d(num_topics, affine=False)
        self.bn_lv = nn.BatchNorm1d(num_topics, affine=False)

    def forward(self, docs):
        h = F.softplus(self.fc1(docs))
        h = self.drop(F.softplus(self.fc2(h)))
        loc = self.bn_mu(self.fc_mu(h))
        scale = (0.5 * self.bn_lv(self.fc_lv(h))).exp()
        return loc, scale


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, num_topics: int, dropout: float):
        super().__init__()
        self.beta = nn.Linear(num_topics, vocab_size, bias=False)
        self.bn = nn.BatchNorm1d(vocab_size, affine=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, theta):
        # Product of experts: word log-probabilities are a theta-weighted sum of topic rows.
        return F.softmax(self.bn(self.beta(self.drop(theta))), dim=-1)


class ProdLDA(nn.Module):
    def __init__(self, vocab_size: int = VOCAB, num_topics: int = TOPICS, hidden: int = HIDDEN,
                 dropout: float = DROPOUT):
        super().__init__()
        self.num_topics = num_topics
        self.encoder = Encoder(vocab_size, num_topics, hidden, dropout)
        self.decoder = Decoder(vocab_size, num_topics, dropout)

    def model(self, docs):
        pyro.module("decoder", self.decoder)
        with pyro.plate("documents", docs.shape[0]):
            logtheta_loc = docs.new_zeros((docs.shape[0], self.num_topics))
            logtheta_scale = docs.new_ones((docs.shape[0], self.num_topics))
            logtheta = pyro.sample("logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1))
            theta = F.softmax(logtheta, -1)
            count_param = self.decoder(theta)
            # Multinomial's density reads each document's length from its counts; total_count
            # only bounds them (the longest document of the batch).
            total_count = int(docs.sum(-1).max())
            pyro.sample("obs", dist.Multinomial(total_count, count_param), obs=docs)

    def guide(self, docs):
        pyro.module("encoder", self.encoder)
        with pyro.plate("documents", docs.shape[0]):
            logtheta_loc, logtheta_scale = self.encoder(docs)
            pyro.sample("logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1))

    def topic_words(self) -> torch.Tensor:
        """``(topics, vocab)``: each topic's word weights (the decoder's product-of-experts rows)."""
        return self.decoder.beta.weight.T.detach()


def synthetic_corpus(num_docs: int, seed: int = 0, vocab: int = VOCAB, topics: int = TOPICS,
                     doc_length: int = 60) -> torch.Tensor:
    """Word counts ``(num_docs, vocab)`` from LDA's generative story with sparse topics (the
    Dirichlet draws use torch's global generator: seed it first)."""
    g = torch.Generator().manual_seed(seed)
    topic_words = torch.distributions.Dirichlet(torch.full((topics, vocab), 0.05)).sample()
    theta = torch.distributions.Dirichlet(torch.full((num_docs, topics), 0.3)).sample()
    lengths = torch.randint(doc_length // 2, doc_length * 3 // 2, (num_docs,), generator=g)
    probs = theta @ topic_words
    return torch.stack([torch.bincount(torch.multinomial(p, int(n), replacement=True, generator=g), minlength=vocab)
                        for p, n in zip(probs, lengths)]).float()


torch.manual_seed(0)
prodlda = ProdLDA()
model, guide = prodlda.model, prodlda.guide


def main(argv: Optional[Sequence[str]] = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ppgen_checks import run_checks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.docs, args.epochs = 800, 6
    torch.manual_seed(1)
    docs = synthetic_corpus(args.docs + 200, seed=1)
    pyro.clear_param_store()
    return run_checks("prodlda", model, guide, docs[200:], docs[:200], smoke=args.smoke, epochs=args.epochs,
                      lr=1e-2, batch_size=100, importance_k=1000 if args.smoke else 5000,
                      sequential_evidence="BatchNorm1d in the decoder reads the particle plate's (K, B, V) "
                                          "input as (N, C, L)")


if __name__ == "__main__":
    main()
