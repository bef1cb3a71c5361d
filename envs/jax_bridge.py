"""Bridge between JAX and torch autograd, for differentiable JAX simulators (Brax) used as torch
``DiffEnv`` tasks.

``JaxFunction(f)`` wraps a JAX function ``f(*arrays) -> tuple of arrays`` so it can be called on
torch tensors inside a torch autograd graph:

    step = JaxFunction(brax_step, vmap=True)          # f(state, action) -> (state', r, c)
    next_state, r, c = step(state, action)            # torch tensors in, torch tensors out
    (r.sum() + c.sum()).backward()                    # gradients via jax.vjp

Tensors cross by DLPack both ways (``jax.dlpack.from_dlpack`` / ``torch.from_dlpack``): zero copy
where the layout allows it, and on GPU the data never visits the host; JAX runs on whichever
device the tensors are on (CPU or CUDA), so nothing here is device specific.

Backward mode (``mode=``):

* ``"recompute"`` (default): forward runs the plain jitted ``f`` and saves only the *inputs*
  (torch's ``save_for_backward``); backward runs one jitted ``jax.vjp(f, *inputs)`` which
  recomputes the forward inside XLA and pulls the cotangents back. Memory per bridged call is
  just its inputs (state + action: 1.2 KiB per step for 64 CartPole envs, 6 KiB for
  HalfCheetah), so a horizon-T rollout holds O(T·n·state_dim) — per-step gradient
  checkpointing. Saving through torch also keeps torch's in-place-modification checks, and
  ``retain_graph`` (g and q by two backward passes) simply recomputes again.
* ``"store"``: forward runs ``jax.vjp`` under jit and keeps the returned VJP object (a pytree of
  the residuals: every intermediate of the step, all physics substeps and all iterations of
  Brax's unrolled constraint solver) on the autograd context; backward only applies it.
  Measured on CPU at 64 envs: residuals are 2.6 MiB per step for CartPole and 54 MiB per step
  for HalfCheetah (8.5 GiB held for a 200-step window), and the backward was *not* faster
  (HalfCheetah 106 vs 107 ms per step fwd+bwd; CartPole 9-12 vs 8-10 ms) — reading the
  residuals back costs about what recomputing them does. Recompute is therefore the default;
  "store" is kept for experiments (e.g. GPUs, where the trade may differ) and short windows.

When no input requires grad (or grad mode is off), the plain jitted forward runs and nothing is
saved, so ``torch.no_grad()`` rollouts cost exactly one XLA call per step.

Importing this module configures JAX (before JAX is first imported, where possible):
* ``XLA_PYTHON_CLIENT_PREALLOCATE=false``: by default JAX grabs 75% of GPU memory at its first
  GPU op, which would starve torch (the policy, autograd graph) sharing the same GPU; with
  preallocation off it allocates on demand. Must be set before ``import jax`` to take effect —
  if something imported jax earlier, the setting is ignored (GPU only; harmless on CPU).
* float32: JAX's default (``jax_enable_x64`` off). Inputs are cast to JAX's default float dtype
  (float64 only if the caller enabled x64, e.g. with ``jax.enable_x64(True)`` in a test) and
  gradients are cast back to each input's dtype.
* a persistent compilation cache in ``$SAFERL_JAX_CACHE`` (default ``~/.cache/saferl/jax``;
  set it to ``0``/``off`` to disable): Brax step/gradient compiles take seconds to tens of
  seconds on CPU and are reused across processes (Ray workers, test runs).
"""
from __future__ import annotations

import os

# Before `import jax`: allocate GPU memory on demand so torch and JAX can share one GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import torch

_CACHE_CONFIGURED: str | None = None


def configure_compilation_cache(cache_dir: str | os.PathLike | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``cache_dir`` (default ``$SAFERL_JAX_CACHE`` or
    ``~/.cache/saferl/jax``). Idempotent; returns the directory in use, or None when disabled.

    jax 0.10 API: ``jax_compilation_cache_dir`` (the directory), plus
    ``jax_persistent_cache_min_compile_time_secs`` (default 1.0 s: only compiles slower than this
    are written) and ``jax_persistent_cache_min_entry_size_bytes``. We lower the time threshold
    to 0.2 s: on a CPU box most Brax kernels take 0.5-50 s, the small ones are cheap to store.
    """
    global _CACHE_CONFIGURED
    if cache_dir is None:
        env = os.environ.get("SAFERL_JAX_CACHE", "")
        if env.lower() in ("0", "off", "false", "none"):
            return None
        cache_dir = env or Path.home() / ".cache" / "saferl" / "jax"
    cache_dir = str(Path(cache_dir).expanduser())
    if cache_dir == _CACHE_CONFIGURED:
        return cache_dir
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (some clusters): run without a persistent cache
        return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _CACHE_CONFIGURED = cache_dir
    return cache_dir


configure_compilation_cache()


# ---------------------------------------------------------------------------------------------
# tensor conversion


def _jax_float() -> jnp.dtype:
    return jnp.zeros(()).dtype  # float32, or float64 while x64 is enabled


def to_jax(t: torch.Tensor) -> jax.Array:
    """Torch tensor -> JAX array on the same device, zero copy when possible.

    Pitfalls handled here (JAX raises on each otherwise): tensors that require grad
    (``BufferError: Can't export tensors that require gradient, use tensor.detach()``),
    non-contiguous views (``UNIMPLEMENTED: Only DLPack tensors with trivial (compact) striding are
    supported``). Floating tensors are cast to JAX's default float dtype (JAX would silently
    truncate float64 to float32 when x64 is off)."""
    t = t.detach()
    if t.is_floating_point() and t.dtype != _TORCH_OF[_jax_float()]:
        t = t.to(_TORCH_OF[_jax_float()])
    t = t.contiguous()
    if t.device.type == "cpu" or _jax_has_platform(t.device.type):
        return jax.dlpack.from_dlpack(t)
    # e.g. CUDA torch with CPU-only jaxlib: go through the host (slow, but correct).
    return jnp.asarray(t.cpu().numpy())


def to_torch(x: jax.Array, device: torch.device | None = None) -> torch.Tensor:
    """JAX array -> torch tensor (zero copy); moved to ``device`` if JAX computed elsewhere."""
    t = torch.from_dlpack(x)
    if device is not None and t.device != device:
        t = t.to(device)
    return t


_TORCH_OF = {jnp.dtype("float32"): torch.float32, jnp.dtype("float64"): torch.float64}


@functools.cache
def _jax_has_platform(kind: str) -> bool:
    platform = {"cuda": "gpu"}.get(kind, kind)
    try:
        return len(jax.devices(platform)) > 0
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------
# the autograd bridge


class _Bridge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: JaxFunction, *inputs: torch.Tensor):
        device = inputs[0].device
        xs = [to_jax(t) for t in inputs]
        if fn.mode == "store":
            outs, vjp = fn._fwd_vjp(*xs)
            ctx.vjp = vjp
        else:
            outs = fn._fwd(*xs)
            ctx.save_for_backward(*inputs)
        ctx.fn, ctx.device = fn, device
        ctx.in_dtypes = [t.dtype for t in inputs]
        return tuple(to_torch(o, device) for o in outs)

    @staticmethod
    def backward(ctx, *cotangents: torch.Tensor):
        fn = ctx.fn
        cts = tuple(to_jax(c) for c in cotangents)
        if fn.mode == "store":
            grads = fn._apply_vjp(ctx.vjp, cts)
        else:
            xs = [to_jax(t) for t in ctx.saved_tensors]
            grads = fn._vjp(xs, cts)
        return (None, *(to_torch(g, ctx.device).to(dt) for g, dt in zip(grads, ctx.in_dtypes)))


class JaxFunction:
    """A JAX function ``f(*arrays) -> array | tuple of arrays`` callable on torch tensors, with
    torch autograd through ``jax.vjp``.

    ``vmap=True`` maps ``f`` over the leading axis of every input (write ``f`` for one env, call
    it on batches). All inputs must be floating tensors on one device; every output is returned
    as a tensor on that device (a tuple, even for one output). See the module docstring for
    ``mode`` ("recompute" | "store")."""

    def __init__(self, f: Callable, vmap: bool = False, mode: str = "recompute"):
        if mode not in ("recompute", "store"):
            raise ValueError(f"mode must be 'recompute' or 'store', not {mode!r}")
        self.mode = mode

        def g(*xs):
            out = f(*xs)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        self.f = jax.vmap(g) if vmap else g
        self._fwd = jax.jit(self.f)
        self._vjp = jax.jit(lambda xs, cts: jax.vjp(self.f, *xs)[1](cts))
        # jax.vjp's result is a pytree (residuals as leaves, the backward jaxpr as static data),
        # so it can leave one jit and enter another without retracing.
        self._fwd_vjp = jax.jit(lambda *xs: jax.vjp(self.f, *xs))
        self._apply_vjp = jax.jit(lambda vjp, cts: vjp(cts))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return _Bridge.apply(self, *inputs)
        device = inputs[0].device
        return tuple(to_torch(o, device) for o in self._fwd(*(to_jax(t) for t in inputs)))


# ---------------------------------------------------------------------------------------------
# optional: a whole window of steps inside JAX


def window_function(step: Callable, observe: Callable, policy: Callable, horizon: int,
                    remat: bool = True) -> Callable:
    """JAX function running ``horizon`` steps with a JAX policy inside one ``lax.scan``:

        window(*params, state [n, S], noise [h, n, A])
            -> (state_h [n, S], sum_r [n], sum_c [n], obs [h+1, n, d], r [h, n], c [h, n])

    ``step(state [n,S], action [n,A]) -> (state', r [n], c [n])`` and ``observe(state) -> obs``
    are batched JAX functions (``BraxTask.batched_step`` / ``batched_observe``) and
    ``policy(params, obs, noise_t) -> action`` (``jax_mlp_policy``'s ``apply``). Wrap the result
    in ``JaxFunction`` to differentiate w.r.t. the torch parameters: one XLA call per window
    instead of one per step (no Python or dispatch per step), at the price of compiling the
    scan and its transpose. ``remat=True`` checkpoints each step (``jax.checkpoint``), so the
    backward keeps only per-step carries, like the per-step bridge in "recompute" mode.

    The per-step bridge with a torch policy stays the main path: it needs no JAX port of the
    policy (critics, normalisers, any torch module work unchanged) and its compile does not
    depend on the window length. On this 2-core CPU the window was no faster (64 envs, h = 10,
    fwd+bwd per window: CartPole 62 vs 67 ms, HalfCheetah 1.24 vs 1.20 s — the time is in XLA,
    not in Python) and compiled ~1.5x longer (27 vs 17 s, 69 vs 46 s); it may pay off on a GPU,
    where per-step dispatch is a larger share.
    """
    def window(*args):
        *params, state, noise = args

        def body(carry, noise_t):
            s, sum_r, sum_c = carry
            obs = observe(s)
            s, r, c = step(s, policy(params, obs, noise_t))
            return (s, sum_r + r, sum_c + c), (obs, r, c)

        f = jax.checkpoint(body) if remat else body
        zeros = jnp.zeros(state.shape[0], state.dtype)
        (state, sum_r, sum_c), (obs, r, c) = jax.lax.scan(f, (state, zeros, zeros), noise,
                                                          length=horizon)
        obs = jnp.concatenate([obs, observe(state)[None]], 0)
        return state, sum_r, sum_c, obs, r, c

    return window


def jax_mlp_policy(policy: torch.nn.Module):
    """A JAX twin of ``saferl.learners.networks.GaussianPolicy`` for ``window_function``.

    Returns ``(tensors, apply)``: ``tensors`` lists the policy's torch tensors — the weights and
    biases of its ``net``, ``log_std``, then the normaliser's mean and variance buffers — to pass
    as ``JaxFunction`` inputs (so gradients reach the torch parameters and new normaliser
    statistics need no recompile); ``apply(tensors, obs [n, d], noise [n, A]) -> action`` is
    the same reparameterised action ``tanh?(μ(norm(obs)) + σ·noise)`` as ``policy.rsample``."""
    acts = {torch.nn.Tanh: jnp.tanh, torch.nn.ELU: jax.nn.elu, torch.nn.ReLU: jax.nn.relu}
    layers, tensors = [], []
    for m in policy.net:
        if isinstance(m, torch.nn.Linear):
            layers.append("linear")
            tensors += [m.weight, m.bias]
        elif type(m) in acts:
            layers.append(acts[type(m)])
        else:
            raise TypeError(f"jax_mlp_policy: unsupported layer {m!r}")
    tensors.append(policy.log_std)
    norm = getattr(policy, "norm", None)
    clip = float(norm.clip) if norm is not None else None
    if norm is not None:
        tensors += [norm.mean, norm.var]
    squash = bool(getattr(policy, "squash", False))

    def apply(ps, obs, noise):
        x, k = obs, 0
        if clip is not None:
            x = jnp.clip((obs - ps[-2]) / jnp.sqrt(ps[-1] + 1e-8), -clip, clip)
        for layer in layers:
            if layer == "linear":
                x = x @ ps[k].T + ps[k + 1]
                k += 2
            else:
                x = layer(x)
        x = x + jnp.exp(ps[k]) * noise
        return jnp.tanh(x) if squash else x

    return tensors, apply


__all__ = ["JaxFunction", "configure_compilation_cache", "jax_mlp_policy", "to_jax", "to_torch",
           "window_function"]

