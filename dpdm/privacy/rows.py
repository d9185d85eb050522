"""Exact per-example gradients by rows: every example is R rows of one batch (noise multiplicity).

With noise multiplicity an example's loss averages its K noisy copies, which go through
the network as K rows of the batch. Its gradient is therefore, for every layer,

    dL_i/dW = sum over the example's rows r (and positions) of  g_r (x) a_r,

where a_r is the layer's input on row r and g_r = dL/d(output_r) its backprop: the same
contraction as the layer's ordinary weight gradient, restricted to the example's rows.
So one ordinary forward over all B x R rows, one backward to the layer OUTPUTS (no weight
gradients), and per layer one batched contraction that sums each example's rows give
every example's exact gradient, at about the cost of a non-private step, holding B x P
numbers (P = parameters), never B x R x P like per-row hooks (the released DPDM code
computes per-row gradients with Opacus and averages them afterwards).

Requirements, checked or tested:
* every trainable parameter belongs to a layer with a rule in `RULES` (dpdm.networks'
  Linear, Conv2d and GroupNorm; torch's Linear, Conv2d with stride 1 / no dilation / no
  groups, GroupNorm, Embedding), each called once per forward; otherwise `unsupported`
  names them. `register_rule` adds a layer type, as Opacus' `register_grad_sampler` does;
* rows are example-major (example b owns rows b*R .. b*R + R - 1) and no operation mixes
  rows of different examples (GroupNorm and attention act per row; BatchNorm would not).
  dpdm.privacy.mechanism.DPSGD verifies this on its first step against torch.func per-example
  gradients (an op that mixed rows would make the sensitivity bound false).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpdm import networks


# ----------------------------------------------------------------------------
# The rules: layer type -> (module, input a [B*R, ...], backprop g [B*R, ...], B) ->
# {param: [B, *param.shape]}. A rule may come with a condition on the module (torch's
# Conv2d: only stride 1, no dilation, no groups, zero padding given as numbers).

RULES: dict[type, tuple] = {}


def register_rule(*layer_types, when=None):
    """Decorator: `fn` computes the per-example gradients of layers of these types."""

    def register(fn):
        for t in layer_types:
            RULES[t] = (fn, when)
        return fn

    return register


def _rule(module):
    """The rule for `module` (looked up along its class hierarchy), or None."""
    for cls in type(module).__mro__:
        if cls in RULES:
            fn, when = RULES[cls]
            return fn if when is None or when(module) else None
    return None


def _own_params(module):
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def unsupported(model) -> list[str]:
    """Names of trainable parameters that no supported layer owns (empty: the model is supported)."""
    bad = []
    for mname, module in model.named_modules():
        if _own_params(module) and _rule(module) is None:
            bad += [f"{mname}.{n}" if mname else n for n, _ in _own_params(module)]
    return bad


def _plain_conv(m) -> bool:
    return (m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


@register_rule(networks.Linear, nn.Linear)
def _linear(m, a, g, b):
    a, g = a.reshape(b, -1, a.shape[-1]).to(g.dtype), g.reshape(b, -1, g.shape[-1])
    out = {m.weight: torch.einsum("bro,bri->boi", g, a)}
    if m.bias is not None:
        out[m.bias] = g.sum(dim=1)
    return out


@register_rule(networks.Conv2d)
def _conv2d(m, a, g, b):
    """Per-example weight gradients of a stride-1 convolution over each example's R rows.

    1x1 without padding: the layer is a matrix product per position, so row n's
    gradient is g_n [Cout, HW] @ a_n^T [HW, Cin]: one batched matrix product over the
    rows, then each example sums its R rows. Otherwise ONE grouped weight-gradient call:
    rows become the batch and examples the groups (a transposed copy of a and g). On 2
    CPU cores, with freed memory kept (dpdm.memory.keep_freed_memory), that beat one
    call per example: 1.22 against 1.61 s per step for the MNIST network's 3x3 layers
    at B = 64, R = 4, timed once on their recorded inputs and backprops; on CUDA it is
    one kernel launch per layer."""
    n, cin = a.shape[:2]
    cout, r = g.shape[1], n // b
    a = a.to(g.dtype)
    padding = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding, m.padding)
    if tuple(m.weight.shape[2:]) == (1, 1) and tuple(padding) == (0, 0):
        per_row = torch.bmm(g.reshape(n, cout, -1), a.reshape(n, cin, -1).transpose(1, 2))
        gw = per_row.reshape(b, r, cout, cin).sum(dim=1).reshape(b, *m.weight.shape)
    else:
        a_grouped = a.reshape(b, r, cin, *a.shape[2:]).transpose(0, 1).reshape(r, b * cin, *a.shape[2:])
        g_grouped = g.reshape(b, r, cout, *g.shape[2:]).transpose(0, 1).reshape(r, b * cout, *g.shape[2:])
        gw = torch.nn.grad.conv2d_weight(a_grouped, (b * cout, cin, *m.weight.shape[2:]), g_grouped,
                                         padding=padding, groups=b).reshape(b, *m.weight.shape) \
            if b else a.new_zeros((0, *m.weight.shape))
    out = {m.weight: gw}
    if m.bias is not None:
        out[m.bias] = g.reshape(b, r, cout, -1).sum(dim=(1, 3))
    return out


register_rule(nn.Conv2d, when=_plain_conv)(_conv2d)


@register_rule(networks.GroupNorm, nn.GroupNorm)
def _group_norm(m, a, g, b):
    c = a.shape[1]
    normalised = F.group_norm(a.to(g.dtype), m.num_groups, eps=m.eps)
    out = {}
    if m.weight is not None:
        out[m.weight] = (normalised * g).reshape(b, -1, c, normalised[0, 0].numel()).sum(dim=(1, 3))
    if m.bias is not None:
        out[m.bias] = g.reshape(b, -1, c, g[0, 0].numel()).sum(dim=(1, 3))
    return out


@register_rule(nn.Embedding, when=lambda m: m.max_norm is None)
def _embedding(m, a, g, b):
    """Row r's gradient is g_r in the row of its index; an example sums its rows."""
    index = a.reshape(b, -1)
    gw = torch.zeros([b, m.num_embeddings, g.shape[-1]], dtype=g.dtype, device=g.device)
    gw.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g.reshape(b, -1, g.shape[-1]))
    return {m.weight: gw}


# ----------------------------------------------------------------------------
# The gradients.


def rows_grads(model, batch_loss_fn, examples):
    """(grads, losses): grads maps each trainable parameter name to its [B, *shape]
    per-example gradients of batch_loss_fn(model, *examples) -> per-example losses [B].

    The forward registers a gradient hook on every layer's output; one backward pass
    (autograd.grad to the outputs of the layers fed by data alone, whose gradients need
    every other layer's) calls them in turn, and each turns its layer's (input, backprop)
    into per-example gradients at once, so backprops are freed as the pass goes, as in
    an ordinary backward, and no weight gradient is computed twice."""
    bad = unsupported(model)
    if bad:
        raise ValueError(f"per-example gradients by rows do not support the layers of {bad[:5]}")
    named = {p: n for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: None for n in named.values()}
    sources, size = [], {}

    def add_grads(module, a, g):
        b = size["examples"]
        if a.shape[0] % b:
            raise ValueError(f"layer {type(module).__name__} saw {a.shape[0]} rows for {b} examples: "
                             "rows must be example-major, the same number per example")
        for p, gp in _rule(module)(module, a, g, b).items():
            if p not in named:  # frozen (fine-tuning a subset, dpdm.finetune): no gradient, not clipped
                continue
            grads[named[p]] = gp if grads[named[p]] is None else grads[named[p]] + gp

    def capture(module, inputs, output):
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        a = inputs[0].detach()
        output.register_hook(lambda g: add_grads(module, a, g))
        if not inputs[0].requires_grad:
            sources.append(output)  # fed by data only: every other layer lies between it and the loss

    # Data never requires grad here, so a layer's input requires grad exactly when an
    # earlier layer feeds it: the hooks of all layers that reach the loss fire.
    examples = [e.detach() if isinstance(e, torch.Tensor) else e for e in examples]
    handles = [m.register_forward_hook(capture) for m in model.modules() if _own_params(m)]
    try:
        losses = batch_loss_fn(model, *examples)
    finally:
        for h in handles:
            h.remove()
    size["examples"] = b = losses.shape[0]
    if sources:
        torch.autograd.grad(losses.sum(), sources, allow_unused=True)
    for (n, p) in model.named_parameters():
        if p.requires_grad and grads[n] is None:  # unused by this loss: zero gradient
            grads[n] = torch.zeros((b, *p.shape), dtype=p.dtype, device=p.device)
    return grads, losses.detach()
