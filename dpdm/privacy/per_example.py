"""Per-example gradients, their norms and their clipped sum (Abadi et al. 2016, Alg. 1 lines 5-7).

Two exact methods, one function (`per_example_grads`): by rows (dpdm.privacy.rows: one
batched forward/backward, per-layer contractions of each example's rows; the fast path,
for the layer types with a rule) and by torch.func (vmap over examples of grad; any
model). `clipped_grad_sum` is what the mechanism uses: chunk by chunk, never more than
one chunk of per-example gradients in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpdm.privacy.rows import rows_grads

if TYPE_CHECKING:
    import torch

METHODS = ("rows", "vmap")


def per_example_grads(model, loss_fn, examples, *, method: str = "vmap", chunk_size=None):
    """(grads, losses): every example's exact gradient, stacked ([B, *shape] per parameter).

    method "vmap": loss_fn(model, *example) is ONE example's scalar loss (torch.func).
    method "rows": loss_fn(model, *examples) is the whole batch's per-example losses [B],
    each example's K rows consecutive (dpdm.privacy.rows; the layers need rules).
    Holds B x P numbers; training uses `clipped_grad_sum`, which never does."""
    if method == "rows":
        return rows_grads(model, loss_fn, examples)
    if method != "vmap":
        raise ValueError(f"unknown per-example gradient method {method!r}; choose one of {METHODS}")
    return vmap_grads(model, loss_fn, examples, chunk_size)


# `loss_fn(module, *example) -> scalar` is the loss of ONE example; everything that
# is random (noise levels, noise, label dropout) is drawn outside and passed in as
# part of the example, so the loss is a deterministic function of (weights, example).
# With noise multiplicity, one example carries its K noise draws and the loss
# averages over them: the gradient of that average is the example's gradient, and
# it is clipped as one unit (the sensitivity is per example, not per draw).


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _example_dims(examples):
    return tuple(None if e is None else 0 for e in examples)


def _batch_len(examples) -> int:
    sizes = {int(e.shape[0]) for e in examples if e is not None}
    if len(sizes) != 1:
        raise ValueError(f"every per-example tensor needs the same leading (batch) size, got {sorted(sizes)}")
    return sizes.pop()


def _select(examples, rows):
    return tuple(None if e is None else e[rows] for e in examples)


def _functional_loss(model, loss_fn):
    """f(params, *example) -> (loss, loss): loss_fn(model, *example) evaluated with `params`.

    `params` maps the model's trainable parameter names to tensors; buffers and frozen
    parameters come from the model itself. Built on torch.func.functional_call, so it
    can be differentiated with torch.func.grad and batched with torch.func.vmap.
    """
    import torch

    class _Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *example):
            return loss_fn(self.m, *example)

    wrapped = _Loss()

    def f(params, *example):
        loss = torch.func.functional_call(wrapped, {"m." + n: t for n, t in params.items()}, args=example)
        if loss.ndim != 0:
            raise ValueError(f"the per-example loss must be a scalar, got shape {tuple(loss.shape)}")
        return loss, loss.detach()

    return f


def iter_per_example_grads(model, loss_fn, examples, chunk_size=None):
    """Yield (rows, grads, losses) for consecutive chunks of at most `chunk_size` examples.

    grads maps each trainable parameter name to a [chunk, *param.shape] tensor: the
    exact gradient of loss_fn(model, *example_i) for each example i of the chunk,
    computed with torch.func (vmap over the example axis of grad). Only one chunk of
    per-example gradients (chunk x P numbers) exists at a time.
    """
    import torch

    examples = tuple(examples)
    n = _batch_len(examples)
    if n == 0:
        return
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    params = {name: p.detach() for name, p in _trainable(model)}
    f = _functional_loss(model, loss_fn)
    batched = torch.func.vmap(torch.func.grad(f, has_aux=True), in_dims=(None,) + _example_dims(examples))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        grads, losses = batched(params, *_select(examples, rows))
        yield rows, grads, losses


def vmap_grads(model, loss_fn, examples, chunk_size=None):
    """(grads, losses): every example's exact gradient, stacked ([B, *shape] per parameter).

    Holds B x P numbers; training uses `clipped_grad_sum`, which never does.
    """
    import torch

    parts = list(iter_per_example_grads(model, loss_fn, examples, chunk_size))
    names = [name for name, _ in _trainable(model)]
    if not parts:
        device = next(model.parameters()).device
        return ({name: torch.zeros((0,) + tuple(p.shape), device=device) for name, p in _trainable(model)},
                torch.zeros(0, device=device))
    grads = {name: torch.cat([g[name] for _, g, _ in parts]) for name in names}
    return grads, torch.cat([loss for _, _, loss in parts])


def per_example_grads_loop(model, loss_fn, examples):
    """Reference implementation: one ordinary autograd pass per example (slow, obviously right)."""
    import torch

    examples = tuple(examples)
    n = _batch_len(examples)
    named = _trainable(model)
    grads = {name: [] for name, _ in named}
    losses = []
    for i in range(n):
        loss = loss_fn(model, *(None if e is None else e[i] for e in examples))
        gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (name, p), g in zip(named, gs):
            grads[name].append(torch.zeros_like(p) if g is None else g.detach())
        losses.append(loss.detach())
    device = next(model.parameters()).device
    return ({name: torch.stack(v) if v else torch.zeros((0,) + tuple(p.shape), device=device)
             for (name, p), v in zip(named, grads.values())},
            torch.stack(losses) if losses else torch.zeros(0, device=device))


def per_example_norms(grads: dict) -> "torch.Tensor":
    """Total L2 norm of each example's gradient over ALL parameters: [B]."""
    import torch

    sq = [g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads.values()]
    return torch.stack(sq, dim=1).sum(dim=1).sqrt()


def clip_factors(norms, clip: float):
    """min(1, C / ||g||) per example (the 1e-6 keeps ||clipped g|| strictly below C)."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def _grad_chunks(model, loss_fn, examples, chunk_size=None, batch_loss_fn=None):
    """(rows, grads, losses) chunk by chunk: by rows (dpdm.privacy.rows, one batched
    forward/backward per chunk, dpdm.privacy.rows) when `batch_loss_fn` is given, else by torch.func vmap."""
    if batch_loss_fn is None:
        yield from iter_per_example_grads(model, loss_fn, examples, chunk_size)
        return
    examples = tuple(examples)
    n = _batch_len(examples)
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        grads, losses = rows_grads(model, batch_loss_fn, _select(examples, rows))
        yield rows, grads, losses


def clipped_grad_sum(model, loss_fn, examples, clip: float, chunk_size=None, batch_loss_fn=None):
    """(sum_i clip(g_i), norms, losses) over the examples, chunk by chunk.

    sum maps each trainable parameter name to a tensor of the parameter's shape;
    norms are the per-example gradient norms BEFORE clipping; losses the per-example
    losses. Memory: one chunk of per-example gradients at a time. With `batch_loss_fn`
    (the per-example losses [B] of a whole batch, the same function as loss_fn) the
    gradients come by rows (dpdm.privacy.rows), else from torch.func vmap over loss_fn.
    """
    import torch

    sums = {name: torch.zeros_like(p, memory_format=torch.contiguous_format) for name, p in _trainable(model)}
    norms, losses = [], []
    for _, grads, loss in _grad_chunks(model, loss_fn, examples, chunk_size, batch_loss_fn):
        norm = per_example_norms(grads)
        finite = torch.isfinite(norm)
        # An example whose gradient is not finite contributes zero (still at most C:
        # the bound holds) instead of turning the whole update into NaN.
        factor = torch.where(finite, clip_factors(norm, clip), torch.zeros_like(norm))
        all_finite = bool(finite.all())
        for name, g in grads.items():
            if not all_finite:
                g = torch.where(finite.view(-1, *([1] * (g.ndim - 1))), g, torch.zeros((), dtype=g.dtype,
                                                                                        device=g.device))
            sums[name].add_(torch.tensordot(factor.to(g.dtype), g, dims=1))
        norms.append(norm)
        losses.append(loss)
    device = next(model.parameters()).device
    return (sums,
            torch.cat(norms) if norms else torch.zeros(0, device=device),
            torch.cat(losses) if losses else torch.zeros(0, device=device))
