"""A model as the sampler sees it: the one ``chipmunk_jax.sampling.Denoiser`` adapter the three models share."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from chipmunk_jax.sampling import Denoiser

__all__ = ["model_denoiser"]


def model_denoiser(config, chipmunk, *, forward: Callable, head: Callable, conditioning: Callable, grid, dtype,
                   timestep_scale: float, kernel_impl=None, model_kw: dict, mesh=None) -> Denoiser:
    """The Denoiser of a model that keeps the contract of docs/architecture.md §4.

    ``forward`` and ``head`` are the model's own (called with ``config``); ``conditioning(params, timestep,
    cond)`` is its ``timestep_conditioning`` for the sampler's ``cond``. The sampler's sigma becomes the model's
    timestep ``sigma * timestep_scale``; the conditioning of every step is computed before the loop
    (``timestep_tables``), and the velocities come back in float32 from both the full call and the head.
    ``model_kw`` go to every forward call (with ``dtype``, and ``kernel_impl`` under Chipmunk); without
    ``chipmunk`` the cache passes through untouched. ``mesh``: every forward runs sequence-parallel on it (the
    sampler shards its caches over the same mesh). ``probe(params, latents, t, cond, kind)`` is the model's
    ``forward(..., probe=kind)`` for the step policies (docs/algorithm.md §4.5)."""
    model_kw = dict(model_kw, dtype=dtype, mesh=mesh, **({} if chipmunk is None else dict(kernel_impl=kernel_impl)))

    def timestep_tables(params, sigmas, cond):
        at = lambda sigma: conditioning(params, sigma * timestep_scale, cond)  # noqa: E731
        return {"sigma": sigmas, "conditioning": jax.vmap(at)(sigmas)}

    def call(params, latents, t, cond, **kw):
        return forward(params, config, hidden_states=latents, timestep=t["sigma"] * timestep_scale,
                       conditioning=t["conditioning"], **cond, **model_kw, **kw)

    def compute(params, latents, t, cond, cache, plan, key):
        chipmunk_kw = {} if chipmunk is None else dict(chipmunk=chipmunk, cache=cache, plan=plan, key=key)
        out = call(params, latents, t, cond, **chipmunk_kw)
        return out.replace(sample=out.sample.astype(jnp.float32), cache=cache if chipmunk is None else out.cache)

    def probe(params, latents, t, cond, kind):
        # Chipmunk's config only for its token order: the probe's base must be in the space of ``hidden``
        return call(params, latents, t, cond, chipmunk=chipmunk, probe=kind)

    def final_layer(params, hidden, t, cond):
        return head(params, config, hidden, t["conditioning"], grid=grid, chipmunk=chipmunk, dtype=dtype,
                    out_dtype=jnp.float32)

    return Denoiser(compute=compute, head=final_layer, timestep_tables=timestep_tables, probe=probe, mesh=mesh,
                    sparse=chipmunk is not None)
