"""A guarded optimiser step without host reads, and a step function replayed as a CUDA graph.

On a GPU, a small network's minibatch step is bound by kernel launches: each of its few hundred
kernels (forward, backward, clip, the optimiser's per-tensor work) waits on Python and the host.
Captured once as a CUDA graph, the whole step is replayed with one launch. Capture forbids host
reads, so the NaN/Inf guard of ``base.guarded_step`` (which reads the loss and the gradient norm)
is written here on the device: the step is always taken, then undone when the loss or the gradient
norm was not finite. With a finite step the floats are the guarded step's.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from saferl.learners.base import clip_factor, total_norm


def guarded_step_on_device(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor,
                           max_grad_norm: float | None = None, backward: Callable | None = None) -> torch.Tensor:
    """``Learner.descend`` without a host read: zero grads, backward (``backward`` replaces
    ``loss.backward()``), clip at ``max_grad_norm``, step; when the loss or the total gradient norm
    is not finite the parameters and the optimiser's state are put back as they were (state the
    step created is zeroed: what a fresh optimiser holds). Returns a 0-d bool tensor: whether the
    step stands."""
    opt.zero_grad()
    (backward or loss.backward)()
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    with torch.no_grad():
        norm = total_norm(grads)
        ok = torch.isfinite(loss.detach()) & torch.isfinite(norm)
        if max_grad_norm is not None:
            torch._foreach_mul_(grads, clip_factor(norm, max_grad_norm))
        before = [(p, {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}) for p in params]
        kept = [p.clone() for p in params]
    opt.step()
    with torch.no_grad():
        for p, old in zip(params, kept):
            p.copy_(torch.where(ok, p, old))
        for p, old in before:
            for k, v in opt.state[p].items():
                if torch.is_tensor(v):
                    v.copy_(torch.where(ok, v, old[k] if k in old else torch.zeros_like(v)))
    return ok


class GraphedStep:
    """``fn(inputs) -> outputs`` (dicts of tensors) replayed as one CUDA graph. The first call runs
    ``fn`` on a side stream (the warm-up capture needs; a real step), the second captures it for
    inputs of that call's shapes and replays it; later calls with those shapes replay, others run
    ``fn`` directly. Whatever ``fn`` reads besides its inputs (parameters, optimiser state, Python
    numbers) is bound at capture: make a new one when such a number changes (once per update)."""

    def __init__(self, fn: Callable[[dict], dict]):
        self.fn, self.shapes, self.graph = fn, None, None
        self.inputs: dict = {}
        self.outputs: dict = {}

    def __call__(self, inputs: dict) -> dict:
        shapes = {k: v.shape for k, v in inputs.items()}
        if self.shapes is None:
            self.shapes = shapes
            return self.warm_up(inputs)
        if shapes != self.shapes:
            return self.fn(inputs)
        if self.graph is None:
            self.capture(inputs)
        for k, v in inputs.items():
            self.inputs[k].copy_(v)
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}

    def warm_up(self, inputs: dict) -> dict:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, inputs: dict) -> None:
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self.fn(self.inputs)
