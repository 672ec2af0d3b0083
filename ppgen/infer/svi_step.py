"""One SVI update as a function of a batch: loss, gradients, the non-finite check and Adam.

The step keeps everything on the device. For the pathwise ELBOs (``Trace_ELBO`` for ``reparam``
and ``stl``, ``analytic-kl``, and ppgen's multi-sample ``iwae``/``dreg``/``vimco``) the loss is
Pyro's ``differentiable_loss`` evaluated under :func:`ppgen.infer.compile.pyro_compat`, a 0-d
tensor, never a Python float. After the backward pass one fused ``torch._foreach_norm`` gives
each gradient's 2-norm, which is finite unless the gradient holds a NaN/inf, or entries so large
that their squares overflow (beyond ~1.8e19 in float32 with float32 accumulation, as on CUDA:
exactly where Adam's second moment ``g^2`` would overflow too); the loss and those norms form the
step's *record* ``(1 + P,)``. A record with a non-finite entry skips the update on the device:
torch's fused AMP check turns the record into ``found_inf``, which fused Adam takes to leave
parameters, moments and step count untouched. Nothing is read on the host:
:func:`ppgen.infer.svi.train_svi` reads the records of an epoch once, at its end (or at a
checkpoint), and applies the stop/skip policy. The score-function family, whose Pyro ELBOs read
the loss on the host, records a NaN loss also when a NaN batch makes an encoder's scale NaN and
``torch.normal`` refuses to draw (instead of that RuntimeError ending the run).

With ``compile=True`` the loss (and through AOTAutograd its backward) runs as one
``torch.compile(fullgraph=True)`` graph. Whether that works depends on model, guide and
estimator; the step compiles on the example batch when it is built, checks the compiled loss and
gradients against the eager ones on the same random draws (inductor's ``fallback_random``, so
a compiled run draws the same numbers as an eager one), and on any failure or difference runs
eagerly and says why in one warning line (for an estimator that cannot compile, naming those
that can). Estimators whose Pyro ELBO reads the loss on the host inside ``loss_and_grads`` (the
score-function family, ``enum``) always run eagerly.

Measured with Pyro 1.9.2 and torch 2.14 on the CPU (tests/infer/test_compile.py and
test_compile_cells.py), and torch 2.11 on CUDA, also with CUDA graphs (tests/test_cuda.py): the
VAE with the diag and fullcov guides, Bernoulli and Gaussian likelihoods, KL warm-up and free
bits, under ``reparam`` (1 particle, and 3 vectorized), ``analytic-kl``, ``iwae`` and ``vimco``
compiles and matches eager within 1e-5, also on batches of other sizes (one recompilation, with
dynamic shapes); so do a model ``model(x, y)`` (positional or keyword batches) with its
datapoints in a plate not named "data", a BatchNorm encoder in train mode, and a global latent
beside local ones (hand-written guide, and :class:`ppgen.infer.autoguide.AmortizedGuide`), and
Pyro's ProdLDA (BatchNorm and Dropout in train mode). The build's check
puts back the RNG state and every buffer of the modules it ran (BatchNorm's running statistics),
so a compiled and an eager run of one seed end with the same buffers and draw the same numbers
after. The IAF guide does not compile (dynamo stops in its transforms) and runs eagerly.
``stl`` (``torch.autograd.grad`` inside the loss) and ``dreg`` (gradient hooks) are not tried.
A model reading a Python float that changes (the KL
weight under warm-up) gets one graph per value, up to :data:`RECOMPILE_LIMIT`.
"""

from __future__ import annotations

import inspect
import math
import random
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ppgen.devices import Distributed, adam
from ppgen.infer.batches import Batch, as_batch
from ppgen.infer.compile import buffers_kept, close, largest, pyro_compat, unsupported_reason
from ppgen.infer.estimators import get_estimator, make_elbo, prepare_guide
from ppgen.infer.estimators.multisample import DReG_ELBO, IWAE_ELBO, VIMCO_ELBO
from ppgen.infer.estimators.pathwise import AnalyticKL_ELBO, sticking_the_landing
from ppgen.infer.particles import check_vectorizable
from ppgen.infer.traces import DATA, DATA_SCALE_KEY, DataPlate, find_data_plate

if TYPE_CHECKING:
    from ppgen.infer.svi import SVIConfig

__all__ = ["DataScale", "SVIStep", "make_svi_step", "nonfinite_parameter", "record_problem"]

#: Graphs one compiled step may hold (torch's default is 8): a model reading a Python float that
#: changes (a KL warm-up weight) is recompiled for each value.
RECOMPILE_LIMIT = 32
_COMPILE_ARGS = inspect.signature(torch.compile).parameters

# Estimators that run a backward pass or register gradient hooks inside the loss, which a
# fullgraph compilation cannot trace (measured: "Unsupported: Observed exception"); not tried.
_EAGER_ESTIMATORS = {
    "stl": "'stl' takes torch.autograd.grad of log q inside the loss (stopped_log_prob)",
    "dreg": "'dreg' registers gradient hooks on the guide's draws inside the loss",
}

# torch.normal's error for a NaN standard deviation (torch 2.x)
_NAN_DRAW = "normal expects all elements of std >= 0.0"

# What a fallback caused by the estimator suggests instead (measured: tests/infer/test_compile*.py).
_COMPILING = "estimators that compile: reparam, analytic-kl, iwae, vimco"

# ELBO classes (exact types: a subclass may change loss_and_grads) whose differentiable_loss is
# the whole estimator, so the step can take the loss as a tensor and compile it.
_DEVICE_LOSS = (Trace_ELBO, AnalyticKL_ELBO, IWAE_ELBO, DReG_ELBO, VIMCO_ELBO)


class DataScale(DataPlate):
    """Multiply the log-density of every site inside the datapoint plate by ``scale``.

    Used with ``scale = N / B`` to turn a minibatch ELBO into an unbiased full-dataset estimate.
    Sites of a plate that already subsamples itself (``subsample_size``) are left alone.
    The factor is also recorded in ``msg["_ppgen_data_scale"]`` (``ppgen.infer.traces.DATA_SCALE_KEY``), so
    per-datapoint bounds (``iwae``, ``dreg``, ``vimco``) can keep it outside their logsumexp
    while other ``poutine.scale`` factors (e.g. KL warm-up) stay inside each log weight. As a
    :class:`ppgen.infer.traces.DataPlate` it also records the plate's name in each sample site.

    :param scale: the factor, ``N / B`` in the loop.
    :param data_plate: name of the plate over datapoints (:func:`ppgen.infer.traces.find_data_plate`).
    """

    def __init__(self, scale: float, data_plate: str = DATA):
        super().__init__(data_plate)
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        super()._process_message(msg)
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.data_plate and (frame.full_size is None or frame.full_size == frame.size):
                msg["scale"] = self.scale * msg["scale"]
                msg[DATA_SCALE_KEY] = self.scale * msg.get(DATA_SCALE_KEY, 1.0)
                return


def record_problem(record: list[float], names: list[str]) -> Optional[str]:
    """Why a step's record (its loss, then each gradient's 2-norm, read on the host) skipped the
    update: ``None`` (it did not), ``"loss"``, or ``"gradient of '<name>'"`` for the first
    parameter whose gradient norm is not finite (a NaN/inf entry, or squares beyond float32)."""
    if not math.isfinite(record[0]):
        return "loss"
    for name, norm in zip(names, record[1:]):
        if not math.isfinite(norm):
            return f"gradient of {name!r}"
    return None


def nonfinite_parameter() -> Optional[str]:
    """The name of the first parameter in Pyro's param store holding a NaN or an infinity, or
    ``None``. One host read when all are finite (a fused max-abs over every parameter)."""
    store = pyro.get_param_store()
    names = list(store.keys())
    values = [store._params[k].detach() for k in names]
    if not values:
        return None
    norms = torch.stack([v.to(torch.float64) for v in torch._foreach_norm(values, math.inf)])
    if bool(norms.isfinite().all()):
        return None
    return next(n for n, v in zip(names, norms.tolist()) if not math.isfinite(v))


class SVIStep:
    """An SVI update on a batch, built by :func:`make_svi_step`.

    ``record = step.on_device(x)`` takes the update and returns its record, a ``(1 + P,)`` tensor
    on the device (the loss, negative ELBO at full-dataset scale, then the gradient 2-norm of
    each of the ``P`` parameters ``step.names``); the update (parameters, Adam's state, and the
    buffers of the modules the step runs, e.g. BatchNorm's running statistics) was applied exactly
    when every entry is finite. No host read. ``step(x)`` does the same and returns the
    loss as a float (NaN when a gradient was not finite), with ``step.nonfinite`` saying why the
    update was skipped (``None``, ``"loss"``, ``"gradient of '<name>'"``): one host read, for
    interactive use and tests.

    Attributes: ``guide`` (the guide as the estimator sees it), ``data_plate``, ``names``,
    ``params``, ``optimizer``, ``compiled`` (whether the loss runs as a compiled graph) and
    ``why_eager`` (why not, or ``None``).
    """

    def __init__(self, model, train_guide, elbo, names, params, optimizer, scale, plate, job, device_loss):
        self.model, self.guide, self.elbo = model, train_guide, elbo
        self.names, self.params, self.optimizer = names, params, optimizer
        self.scale, self.data_plate, self.job = scale, plate, job
        self.device_loss = device_loss
        self.fused = bool(optimizer.defaults.get("fused"))
        self.compiled, self.why_eager, self._compiled_loss, self.cudagraphs = False, None, None, False
        self._checking = False
        self.estimator: Optional[str] = None  # the estimator's name, set by make_svi_step
        self.nonfinite: Optional[str] = None
        self.buffers: list[torch.Tensor] = []  # module buffers the step moves (BatchNorm statistics)
        self._found: Optional[torch.Tensor] = None  # found_inf of the skip policy, reused
        self._one: Optional[torch.Tensor] = None

    # -- the loss ----------------------------------------------------------------------------
    def _loss(self, *args, **kwargs) -> torch.Tensor:
        with DataScale(self.scale, self.data_plate):
            return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

    def _loss_and_grads(self, args: tuple, kwargs: dict) -> torch.Tensor:
        # Model, guide and data were validated by the registration pass; re-checking every
        # distribution's arguments each step costs about 5% of a VAE step (bench/svi_step.py).
        with pyro.validation_enabled(False):
            if not self.device_loss:  # Pyro's own loss_and_grads, which reads the loss on the host
                try:
                    with DataScale(self.scale, self.data_plate):
                        loss = self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)
                except RuntimeError as e:
                    # A non-reparameterized draw (torch.normal) refuses a NaN scale, which a NaN in
                    # the batch makes of an encoder's output: the pathwise step's NaN loss, skipped
                    if not str(e).startswith(_NAN_DRAW):
                        raise
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = math.nan
                return torch.as_tensor(loss, dtype=self.params[0].dtype, device=self.params[0].device)
            with pyro_compat():
                loss = self._compiled_call(args, kwargs) if self.compiled else None
                if loss is None:
                    loss = self._loss(*args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()

    def _compiled_call(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The compiled loss, or ``None`` (from then on eager, one warning) if it needed a
        recompilation that failed: a new graph break, or more than ``RECOMPILE_LIMIT`` graphs
        (each distinct Python float the model reads, e.g. a KL weight, is one graph)."""
        from torch._dynamo import exc

        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are done with
        try:
            return self._compiled_loss(*args, **kwargs)
        except (exc.TorchDynamoException, getattr(exc, "FailOnRecompileLimitHit", exc.TorchDynamoException),
                exc.BackendCompilerFailed) as e:
            if self._checking:  # compile() reports it
                raise
            self.compiled, self._compiled_loss, self.why_eager = False, None, _compile_failure(e)
            warnings.warn(f"--compile: running the SVI step eagerly from now on: {self.why_eager}",
                          RuntimeWarning, stacklevel=4)
            return None

    def compile(self, example: Any, mode: Optional[str] = None) -> None:
        """Compile the loss with ``torch.compile(fullgraph=True)`` and check it on ``example``
        against the eager loss and gradients (same draws); on failure stay eager, warn once.

        :param mode: ``None`` (inductor's default) or ``"reduce-overhead"``: CUDA graphs of the
            loss's forward and backward, for CUDA only (measured in bench/svi_step.py)."""
        if mode not in (None, "reduce-overhead"):
            raise ValueError(f"mode must be None or 'reduce-overhead', got {mode!r}")
        example = as_batch(example, "example", self.model)
        options: dict = {"fallback_random": True}
        if mode == "reduce-overhead":
            options["triton.cudagraphs"] = True
        self.cudagraphs = mode == "reduce-overhead"
        reason = unsupported_reason()
        if reason is None and self.estimator in _EAGER_ESTIMATORS:
            reason = (f"{_EAGER_ESTIMATORS[self.estimator]}, which torch.compile(fullgraph=True) cannot trace; "
                      f"{_COMPILING}")
        if reason is None and not self.device_loss:
            reason = (f"{type(self.elbo).__name__} reads its loss on the host in loss_and_grads "
                      f"(score-function and enumeration estimators); {_COMPILING}")
        if reason is None:
            limit = {"recompile_limit": RECOMPILE_LIMIT} if "recompile_limit" in _COMPILE_ARGS else {}
            self._compiled_loss = torch.compile(self._loss, fullgraph=True, options=options, **limit)
            reason = self._check_compiled(example)
        if reason is not None:
            self._compiled_loss, self.why_eager = None, reason
            warnings.warn(f"--compile: running the SVI step eagerly: {reason}", RuntimeWarning, stacklevel=3)
        else:
            self.compiled = True

    def _check_compiled(self, example: Batch) -> Optional[str]:
        """Why the compiled loss cannot stand in for the eager one on ``example``, or ``None``.

        Runs the loss and its backward twice on the same draws, eagerly and compiled. Neither run
        may leave a trace: the RNG states (torch's, Python's, NumPy's), and every buffer of every
        ``nn.Module`` the step runs (``self.buffers``: BatchNorm's running statistics and batch
        count in train mode, spectral norm's power-iteration vector), are put back as they were, so a
        compiled run and an eager run of one seed continue identically. (A module's state held
        outside its buffers, or a buffer changed without calling its module, is not covered.)"""
        cpu, cuda = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        host_rng = (random.getstate(), np.random.get_state())  # pyro.set_rng_seed seeds these too
        buffers = [b.clone() for b in self.buffers]  # those make_svi_step saw the model and guide move

        def run(compiled: bool) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            self.compiled = compiled
            try:
                loss = self._loss_and_grads(example.args, example.kwargs)
                return loss, [None if p.grad is None else p.grad.clone() for p in self.params]
            finally:
                self.compiled = False
                self.optimizer.zero_grad(set_to_none=True)

        self._checking = True
        try:
            eager_loss, eager_grads = run(False)
            try:
                loss, grads = run(True)
            except Exception as e:  # noqa: BLE001 - any failure to compile means: run eagerly
                return _compile_failure(e)
            if not close(loss.reshape(1), eager_loss.reshape(1)):
                return f"compiled loss {float(loss):.6g} differs from the eager {float(eager_loss):.6g}"
            # One scale for all gradients: a gradient that is zero in exact arithmetic (a bias
            # in front of a BatchNorm) is rounding noise of the size of the terms it sums.
            scale = max((largest(e) for e in eager_grads if e is not None), default=0.0)
            for name, g, e in zip(self.names, grads, eager_grads):
                if (g is None) != (e is None) or (g is not None and not close(g, e, scale)):
                    return f"compiled gradient of {name!r} differs from the eager one"
            return None
        finally:
            self._checking = False
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            random.setstate(host_rng[0])
            np.random.set_state(host_rng[1])
            with torch.no_grad():
                for b, value in zip(self.buffers, buffers):
                    b.copy_(value)

    # -- the update --------------------------------------------------------------------------
    def on_device(self, x: Any, halt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Take the update on batch ``x`` and return its record (see the class docstring).

        :param halt: optional 0-d float tensor on the device, 0 or 1: once a step's record is
            not finite it is set to 1 (in place) and no later step that is given it updates
            anything: the stop policy, decided on the host later.
        """
        if isinstance(x, torch.Tensor):
            args, kwargs = (x,), {}
        else:
            batch = x if isinstance(x, Batch) else as_batch(x, "batch", self.model)
            args, kwargs = batch.args, batch.kwargs
        before = [b.clone() for b in self.buffers]
        loss = self._loss_and_grads(args, kwargs)
        if self.job.world > 1:
            (loss,) = self.job.average(self.params, loss)
        grads = [p.grad for p in self.params]
        present = [g for g in grads if g is not None]
        norms = iter(torch._foreach_norm(present) if present else [])  # one pass; ord=inf is 10x slower on CPU
        dtype = present[0].dtype if present else loss.dtype
        record = torch.stack([loss.to(dtype)] + [next(norms) if g is not None else loss.new_zeros((), dtype=dtype)
                                                 for g in grads])
        # found_inf = 1 where the record holds a NaN/inf: one fused check (torch's AMP kernel, with
        # an unscale by 1). Under the stop policy `halt` is never cleared, so it stays 1.
        if halt is None:
            if self._found is None or self._found.device != record.device:
                self._found = torch.zeros((), dtype=torch.float32, device=record.device)
            halt = self._found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_([record], halt, self._unit(record.device))
        if before:  # a skipped step leaves the buffers as it found them too (no NaN running statistics)
            skip = halt.bool()
            with torch.no_grad():
                for b, old in zip(self.buffers, before):
                    b.copy_(torch.where(skip, old, b))
        if self.fused:  # fused Adam skips the whole update (moments and step count too) when 1
            self.optimizer.found_inf = halt
            self.optimizer.step()
        elif not bool(halt):  # the multi-tensor kernel has no found_inf: one host read
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return record

    def _unit(self, device: torch.device) -> torch.Tensor:
        if self._one is None or self._one.device != device:
            self._one = torch.ones((), dtype=torch.float32, device=device)
        return self._one

    def __call__(self, x: Any) -> float:
        record = self.on_device(x).tolist()
        self.nonfinite = record_problem(record, self.names)
        return record[0] if self.nonfinite in (None, "loss") else math.nan


def _compile_failure(e: Exception) -> str:
    """One line: what torch.compile said, and the innermost user-code line it was tracing."""
    lines = [line.strip() for line in str(e).strip().splitlines()]
    frames = [line for line in lines if line.startswith('File "')]
    where = ""
    if frames:  # 'File "/path/to/x.py", line 12, in f' -> 'x.py:12 in f'
        path, _, rest = frames[-1][6:].partition('", line ')
        where = f" (in {path.rsplit('/', 1)[-1]}:{rest.replace(', in ', ' in ')})"
    return f"torch.compile(fullgraph=True) failed: {type(e).__name__}: {(lines or [''])[0][:160]}{where}"


def make_svi_step(
    model: Callable,
    guide: Callable,
    config: "SVIConfig",
    example,
    scale: float = 1.0,
    job: Distributed = Distributed(0, 1, 0),
    data_plate: str = DATA,
) -> tuple[SVIStep, torch.optim.Optimizer]:
    """One SVI update as a function of a batch (:class:`SVIStep`), and the optimizer it steps.

    Clears Pyro's param store, registers every parameter with one trace of model and guide on
    ``example``, and builds a single fused ``torch.optim.Adam`` over all of them. The step
    computes the estimator's loss and gradients on a batch with the data plate scaled by
    ``scale`` (``N / B``) and takes the Adam step unless the loss or any gradient is NaN or
    infinite (decided on the device, see :class:`SVIStep`). With ``config.compile`` the loss is
    compiled here, on ``example``, where model, guide and estimator allow it (else one warning
    and eager). In a data-parallel ``job`` (torch.distributed), gradients and loss are averaged
    over its processes before the step. ``step.guide`` is the guide as the estimator sees it
    (:func:`prepare_guide`); if it has ``training_state()``/``load_training_state(state)`` (e.g.
    a learned baseline), :func:`ppgen.infer.svi.train_svi` checkpoints that state too.

    :param example: a batch as the model takes it: a tensor, a tuple of model arguments aligned
        on dim 0, or a dict of keyword arguments (:func:`ppgen.infer.batches.as_batch`); the step
        takes batches of the same form.
    :param data_plate: name of the plate over datapoints; if the model has none of that name,
        the single plate of the example's batch size (:func:`ppgen.infer.traces.find_data_plate`).
        ``step.data_plate`` is the plate used. With ``scale != 1`` a missing or ambiguous plate
        is an error (the minibatch would silently go unscaled).
    """
    pyro.clear_param_store()
    example = as_batch(example, "example", model)
    # Vectorized particles and TraceEnum_ELBO (at any particle count) need the plate nesting. Pyro
    # would guess it at the first step by running guide and model once on the training RNG stream,
    # so a resumed run would draw other numbers than the uninterrupted one. Found here off the RNG,
    # for every estimator (a user-registered ELBO may guess too); a non-vectorized Trace_ELBO
    # ignores it.
    found = find_data_plate(model, guide, example.args, example.kwargs, example.size, data_plate,
                            required=scale != 1.0)
    plate, nesting = found.data_plate or data_plate, found.nesting
    elbo = make_elbo(config.estimator, config.particles, config.particles > 1, nesting)
    if getattr(elbo, "vectorize_particles", False) and found.data_plate is not None:
        check_vectorizable(model, guide, example.args, example.kwargs, nesting, plate, example.size,
                           example.device, f"estimator {config.estimator!r} with {config.particles} particle(s)")
    train_guide = prepare_guide(config.estimator, guide)
    # A throwaway trace: it must not move BatchNorm statistics (as ppgen.infer.traces' traces)
    with poutine.trace(param_only=True) as capture, torch.no_grad(), buffers_kept() as kept:
        Trace_ELBO().loss(model, guide, *example.args, **example.kwargs)
    names = list(capture.trace.nodes)
    params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    optimizer = adam(params, config.lr)
    est = get_estimator(config.estimator)
    device_loss = (type(elbo) in _DEVICE_LOSS and est.guide_transform in (None, sticking_the_landing)
                   and unsupported_reason() is None)
    step = SVIStep(model, train_guide, elbo, names, params, optimizer, scale, plate, job, device_loss)
    step.estimator = config.estimator
    step.buffers = [buf for buf, _ in kept.saved.values()]
    if getattr(config, "compile", False):
        step.compile(example)
    return step, optimizer
