"""A guide that never proposes values of a discrete latent the model allows is refused
(ppgen.infer.support.check_guide_support, called by log_evidence and joint_log_evidence); guides
whose support covers the model's are accepted and match the exact evidence.

The model is M2-like (Kingma et al. 2014) and small enough for an exact marginal: a class
``y ~ Categorical(pi)``, a style ``z ~ N(0, 1)`` and ``x ~ N(mu_y + a z, sigma^2 I)``, so
``p(x | y) = N(mu_y, a a^T + sigma^2 I)`` and ``log p(x) = logsumexp_y [log pi_y + log p(x | y)]``,
summed over the classes by hand. As in examples/pyro_models/ss_vae.py, ``model(x, y, labelled)``
keeps ``y`` latent in every row and the guide pins it to the label in the labelled rows.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppgen.infer.evidence as evidence
from ppgen.infer.evidence import log_evidence
from ppgen.infer.nested_evidence import joint_log_evidence
from ppgen.infer.support import check_guide_support, uncovered_values

C, D, SIGMA = 3, 2, 0.5
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
CENTRES = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # mu_y = sep * CENTRES
OVERLAP, APART = 0.5, 8.0  # class separations: overlapping (p(y | x) spread), far apart (p(y | x) ~ one-hot)
A = torch.tensor([1.0, 0.5], dtype=torch.float64)
PIN = 1e4  # ss_vae's logit gap: exp(-1e4) is exactly 0


def _log_px_given_y(x, sep):  # (N, C): log N(x; mu_y, a a^T + sigma^2 I)
    cov = torch.outer(A, A) + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    return dist.MultivariateNormal(sep * CENTRES, cov).log_prob(x.unsqueeze(-2))


def exact_log_px(x, sep=OVERLAP, prior=None):
    """log p(x_n), shape (N,), summing the classes by hand (``prior``: (N, C) probabilities)."""
    log_prior = PI.log() if prior is None else prior.log()
    return torch.logsumexp(log_prior + _log_px_given_y(x, sep), -1)


def posterior_y(x, sep=OVERLAP, prior=None):
    log_joint = (PI.log() if prior is None else prior.log()) + _log_px_given_y(x, sep)
    return torch.softmax(log_joint, -1)


def allowed(x):
    """A support that depends on the data: class 2 is impossible where x_0 < 0."""
    return torch.stack([torch.ones_like(x[:, 0]), torch.ones_like(x[:, 0]), (x[:, 0] >= 0).double()], -1)


def model(x, y=None, labelled=None, data_support=False, sep=OVERLAP):
    n = x.shape[0]
    with pyro.plate("data", n):
        probs = PI.expand(n, C) if not data_support else allowed(x) / allowed(x).sum(-1, keepdim=True)
        y = pyro.sample("y", dist.Categorical(probs=probs), obs=y if labelled is None else None)
        z = pyro.sample("z", dist.Normal(torch.zeros(n, dtype=torch.float64), 1.0))
        loc = sep * CENTRES[y] + A * z.unsqueeze(-1)
        pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=x)


def make_guide(kind="mixed", enumerate=False):
    """``kind``: 'mixed' (half the exact p(y | x), half uniform), 'confident' (logit gap 60 on the
    most probable class: the others get e^-60 ~ 1e-26, tiny but positive), 'pin-probs' (the
    labelled rows' one-hot as probs, which torch's log_prob clamps to log(eps) ~ -36 in float64),
    'logits' ('mixed' as logits, -1e4 where its probs are 0)."""
    infer = {"enumerate": "parallel"} if enumerate else {}

    def guide(x, y=None, labelled=None, data_support=False, sep=OVERLAP):
        n = x.shape[0]
        prior = allowed(x) / allowed(x).sum(-1, keepdim=True) if data_support else None
        with pyro.plate("data", n):
            post = posterior_y(x, sep, prior)
            if kind == "confident":
                logits = 60.0 * torch.nn.functional.one_hot(post.argmax(-1), C).double()
                q = dist.Categorical(logits=logits)
            else:
                probs = 0.5 * post + 0.5 * (allowed(x) / allowed(x).sum(-1, keepdim=True) if data_support else 1 / C)
                q = dist.Categorical(probs=probs)
                if kind == "logits":  # the same, its zeros made by a logit gap of 1e4 (exp underflows to 0)
                    q = dist.Categorical(logits=torch.where(probs > 0, probs.log(), probs.new_tensor(-PIN)))
            if labelled is not None:  # a labelled row: the point mass on its label
                onehot = torch.nn.functional.one_hot(y, C).double()
                if kind == "pin-probs":
                    q = dist.Categorical(probs=torch.where(labelled.unsqueeze(-1), onehot, q.probs))
                else:
                    q = dist.Categorical(logits=torch.where(labelled.unsqueeze(-1), (onehot - 1) * PIN, q.logits))
            yq = pyro.sample("y", q, infer=infer)
            # q(z | x, y): the exact Gaussian posterior, 1.3 times wider (bounded weights)
            prec = 1 + A.dot(A) / SIGMA**2
            mean = ((x - sep * CENTRES[yq]) @ A) / SIGMA**2 / prec
            pyro.sample("z", dist.Normal(mean, 1.3 / math.sqrt(prec)))

    return guide


def data(n=20, seed=0, sep=OVERLAP):
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(PI, n, replacement=True, generator=g)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    x = sep * CENTRES[y] + A * z.unsqueeze(-1) + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, y


def _matches(r, exact, k=4.0):
    se = r.stderr
    assert torch.all((r.log_px - exact).abs() <= k * se + 1e-9), (r.log_px - exact, se)
    total_se = float(r.stderr.pow(2).sum().sqrt())
    assert abs(float((r.log_px - exact).sum())) <= k * total_se + 1e-9


@pytest.mark.parametrize("enumerate", [False, True])
def test_without_labels_matches_the_exact_marginal(enumerate):
    x, _ = data()
    r = log_evidence(model, make_guide("mixed", enumerate), x, 200, batch_size=8)
    _matches(r, exact_log_px(x))
    assert float(r.stderr.max()) < 0.1  # the comparison is sharp: ~0.1 nats at worst


def test_enumerated_guide_site_draws_as_the_plain_one():
    x, _ = data()
    plain = log_evidence(model, make_guide("mixed"), x, 50, seed=3)
    enumerated = log_evidence(model, make_guide("mixed", enumerate=True), x, 50, seed=3)
    assert torch.equal(plain.log_px, enumerated.log_px)


@pytest.mark.parametrize("kind", ["mixed", "pin-probs"])
def test_labels_given_are_refused_with_the_site_count_and_what_to_do(kind, monkeypatch):
    x, y = data()
    labelled = torch.zeros(20, dtype=torch.bool)
    labelled[[9, 12, 13, 17, 19]] = True  # none in the first chunk of 8: every chunk is checked
    with pytest.raises(ValueError) as info:
        log_evidence(model, make_guide(kind), (x, y, labelled), 100, batch_size=8)
    message = str(info.value)
    assert "probability 0" in message and "'y' in 5 of 20 datapoints" in message
    assert "log p(x, y)" in message and "without them" in message and "positive probability" in message
    # What the message says to do works: without the labels the estimate is the exact log p(x).
    _matches(log_evidence(model, make_guide(kind), x, 200, batch_size=8), exact_log_px(x))
    # Why: unchecked, the labelled rows get log p(x, y) with small SE and k-hat -inf (weights alike).
    monkeypatch.setattr(evidence, "check_guide_support", lambda *a, **k: None)
    r = log_evidence(model, make_guide(kind), (x, y, labelled), 200, batch_size=8)
    log_pxy = PI.log()[y] + _log_px_given_y(x, OVERLAP).gather(-1, y.unsqueeze(-1))[:, 0]
    _matches(r, torch.where(labelled, log_pxy, exact_log_px(x)))
    gap = exact_log_px(x)[labelled] - log_pxy[labelled]
    assert float(gap.min()) > 10 * float(r.stderr[labelled].max())  # far from log p(x)


def test_a_confident_guide_is_accepted_and_exact():
    x, _ = data(sep=APART)
    assert float(posterior_y(x, APART).max(-1).values.min()) > 1 - 1e-9  # the model is as sure as the guide
    r = log_evidence(model, make_guide("confident"), x, 200, sep=APART)  # the others get e^-60, not 0
    _matches(r, exact_log_px(x, APART))


def test_a_support_that_depends_on_the_data():
    x, _ = data()
    assert 0 < int((x[:, 0] < 0).sum()) < 20
    prior = allowed(x) / allowed(x).sum(-1, keepdim=True)
    for kind in ("mixed", "logits"):  # zeros where the model's are: as probs, or as an underflowing logit gap
        r = log_evidence(model, make_guide(kind), x, 200, data_support=True)
        _matches(r, exact_log_px(x, prior=prior))
    # The guide of the full support on the plain model covers it; the restricted one does not.
    found = uncovered_values(model, lambda x, data_support=False: make_guide("mixed")(x, data_support=True),
                             [((x,), {})], "data")
    assert found["y"].count == int((x[:, 0] < 0).sum()) and found["y"].size == 20


def test_the_check_leaves_the_random_stream_alone(monkeypatch):
    x, y = data()
    labelled = torch.ones(20, dtype=torch.bool)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    with pytest.raises(ValueError):
        check_guide_support(model, make_guide(), [((x, y, labelled), {})], "data")
    assert check_guide_support(model, make_guide(), [((x,), {})], "data") is None
    assert torch.equal(torch.get_rng_state(), state)
    # Drawing from the caller's stream (seed=None), the numbers are those without the check.
    for pair in ((model, make_guide()), (_continuous_model, _continuous_guide)):
        torch.manual_seed(2)
        checked = log_evidence(*pair, x, 30, seed=None, batch_size=8)
        after = torch.get_rng_state()
        with monkeypatch.context() as m:
            m.setattr(evidence, "check_guide_support", lambda *a, **k: None)
            torch.manual_seed(2)
            unchecked = log_evidence(*pair, x, 30, seed=None, batch_size=8)
        assert torch.equal(checked.log_px, unchecked.log_px) and torch.equal(torch.get_rng_state(), after)


def test_the_check_traces_one_chunk_of_a_continuous_pair_and_every_chunk_of_a_discrete_one():
    x, _ = data()
    chunks = [((x[i:i + 8],), {}) for i in range(0, 20, 8)]
    for guide, traced in ((_continuous_guide, 1), (make_guide(), 3)):
        calls = []
        counting = lambda x, guide=guide: calls.append(len(x)) or guide(x)  # noqa: E731
        uncovered_values(model if traced == 3 else _continuous_model, counting, chunks, "data")
        assert calls == [8, 8, 4][:traced]


def _continuous_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], dtype=torch.float64), 1.0))
        pyro.sample("x", dist.Normal(A * z.unsqueeze(-1), SIGMA).to_event(1), obs=x)


def _continuous_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ A / (A.dot(A) + SIGMA**2), 0.7))


def _switch_model(x):
    g = pyro.sample("g", dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(2.0 * g, 1.0), obs=x)


def test_joint_evidence_refuses_a_pinned_global_and_matches_exact_otherwise():
    x = torch.tensor([1.8, 2.5, 0.9, 2.2], dtype=torch.float64)

    def guide(p):
        return lambda x: pyro.sample("g", dist.Bernoulli(torch.tensor(p, dtype=torch.float64)))

    with pytest.raises(ValueError, match="'g' outside the datapoint plate 'data'"):
        joint_log_evidence(_switch_model, guide(1.0), x, num_outer=20)
    r = joint_log_evidence(_switch_model, guide(0.7), x, num_outer=400)
    exact = torch.logsumexp(math.log(0.5) + torch.stack(
        [dist.Normal(2.0 * g, 1.0).log_prob(x).sum() for g in (0.0, 1.0)]), 0)
    assert abs(r.log_px - float(exact)) <= 4 * r.stderr


def test_a_bernoulli_pinned_by_probs_is_refused_one_confident_by_logits_is_not():
    """float32: sigmoid(17) rounds to 1, yet the logits give the other value exp(-17), not 0."""
    x = torch.randn(6)

    def coin_model(x):
        with pyro.plate("data", len(x)):
            b = pyro.sample("b", dist.Bernoulli(torch.full_like(x, 0.5)))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def coin_guide(**given):
        return lambda x: _in_plate(x, lambda: pyro.sample("b", dist.Bernoulli(**given)))

    pinned = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.5, 0.5])
    assert uncovered_values(coin_model, coin_guide(probs=pinned), [((x,), {})], "data")["b"].count == 3
    assert uncovered_values(coin_model, coin_guide(logits=torch.full((6,), 17.0)), [((x,), {})], "data") == {}
    assert uncovered_values(coin_model, coin_guide(logits=torch.full((6,), 1e4)), [((x,), {})], "data")["b"].count == 6


def _in_plate(x, draw):
    with pyro.plate("data", len(x)):
        draw()


def test_a_vector_of_bits_is_checked_element_by_element_and_matches_exact():
    """b_n in {0,1}^2 (Bernoulli(0.3).to_event(1)), x_n ~ N(b_n, 1): log p(x_n) sums the 4 codes by hand."""
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    p = torch.tensor(0.3, dtype=torch.float64)

    def bits_model(x):
        with pyro.plate("data", len(x)):
            b = pyro.sample("b", dist.Bernoulli(p.expand(len(x), 2)).to_event(1))
            pyro.sample("x", dist.Normal(b, 1.0).to_event(1), obs=x)

    def bits_guide(x, pin=None):
        with pyro.plate("data", len(x)):
            probs = torch.full_like(x, 0.5)
            if pin is not None:  # the first bit of the first `pin` rows set to 1 for sure
                probs[:pin, 0] = 1.0
            pyro.sample("b", dist.Bernoulli(probs).to_event(1))

    with pytest.raises(ValueError, match="'b' in 5 of 12 datapoints"):
        log_evidence(bits_model, lambda x: bits_guide(x, pin=5), x, 10)
    codes = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    log_prior = dist.Bernoulli(p).log_prob(codes).sum(-1)  # (4,)
    exact = torch.logsumexp(log_prior + dist.Normal(codes, 1.0).log_prob(x.unsqueeze(-2)).sum(-1), -1)
    _matches(log_evidence(bits_model, bits_guide, x, 400), exact)
