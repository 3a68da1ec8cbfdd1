"""Per-example clipping in one backward pass, for the layers of the registry's vector models.

DP-SGD needs, per step, the clipped sum  sum_i min(1, C / ||g_i||) g_i  of the per-example
gradients g_i (Abadi et al. 2016). Opacus's ``hooks`` mode materialises every g_i (a
[B, *param] tensor per parameter) on top of the plain backward pass, which also computes
the unclipped weight gradients; ``ghost`` mode runs a second backward pass. For the
layers of ``mlp-small``, ``mlp-large`` and ``cnn-small`` neither is needed: each layer's
per-example gradient is a small function of its input a_i and the gradient b_i of the loss
with respect to its output, both of which one backward pass through the *inputs* provides.

* ``nn.Linear`` on [B, in] inputs (Goodfellow 2015, "Efficient per-example gradient
  computations"): g_i(W) = b_i a_i^T, so ||g_i(W)||^2 = ||b_i||^2 ||a_i||^2 and
  ||g_i(bias)||^2 = ||b_i||^2 without forming g_i; the clipped sum is one matrix product,
  (c * B)^T A, the cost of the plain weight gradient.
* ``nn.Conv2d``: g_i(W) = b_i U_i^T with U_i the unfolded (im2col) input, formed per example
  (B x out x in*k*k values: small for these layers); bias: sum over positions of b_i.
* ``nn.GroupNorm`` (affine): g_i(weight) = sum over positions of xhat_i * b_i, g_i(bias) =
  sum over positions of b_i, with xhat the normalised input.

How: while :class:`DirectClipping` is attached, each such layer computes its output with
its parameters *detached* (so autograd never computes the unclipped weight gradients),
keeps its input, and hooks its output's gradient. When the last of these gradients arrives
(the first layer's: backward runs in reverse), the per-example norms
||g_i||^2 = sum over parameters, the clip factors c_i = min(1, C / (||g_i|| + 1e-6))
(Opacus's formula) and the clipped sums are computed and written to ``p.grad``, which is
what Opacus's ``DPOptimizerFastGradientClipping`` (ghost mode's optimizer) expects: it adds
N(0, (sigma C)^2) and divides by the expected batch size. The loss must be a per-example
mean (``reduction="mean"``): the output gradients are multiplied by the batch size to give
per-example gradients of l_i.

A model with any other layer that has trainable parameters is not supported
(:func:`supports_direct` says so); :func:`fedkd.privacy.dpsgd.resolve_grad_sample_mode`
then picks an Opacus mode.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DIRECT_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)
"""Layer types whose per-example gradients :class:`DirectClipping` computes."""

_EPS = 1e-6  # Opacus's: clip factor C / (||g_i|| + 1e-6), at most 1


def supports_direct(model: nn.Module) -> bool:
    """True when every module holding trainable parameters of its own is an
    ``nn.Linear``, a 2-d ``nn.Conv2d`` with ``groups == 1`` or an affine ``nn.GroupNorm``
    (exact types: a subclass may change ``forward``)."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) is nn.Linear:
            continue
        if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
            continue
        if type(module) is nn.GroupNorm and module.affine:
            continue
        return False
    return True


class DirectClipping:
    """Attach to ``model`` (:meth:`attach`), run forward and ``loss.backward()`` as usual:
    each trainable parameter's ``.grad`` is then the clipped sum
    sum_i min(1, C / (||g_i|| + 1e-6)) g_i over the batch's examples (see the module doc),
    ``max_grad_norm`` = C. :meth:`detach` restores the layers' own ``forward``.
    ``last_norms`` holds the batch's per-example gradient norms (for tests and diagnostics)."""

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        if not supports_direct(model):
            raise ValueError("direct per-example clipping supports only nn.Linear, nn.Conv2d and affine "
                             "nn.GroupNorm layers with trainable parameters")
        self.model, self.max_grad_norm = model, float(max_grad_norm)
        self.layers = [m for m in model.modules() if isinstance(m, DIRECT_LAYERS)
                       and any(p.requires_grad for p in m.parameters(recurse=False))]
        self._pending: list[tuple[nn.Module, torch.Tensor, list[torch.Tensor | None]]] = []
        self._arrived = 0
        self._handle = None
        self.last_norms: torch.Tensor | None = None

    # ------------------------------------------------------------------ patching

    def attach(self) -> DirectClipping:
        for layer in self.layers:
            layer.forward = types.MethodType(_direct_forward(type(layer).forward, self), layer)
        self._handle = self.model.register_forward_pre_hook(lambda module, args: self._reset())
        return self

    def detach(self) -> None:
        for layer in self.layers:
            if "forward" in layer.__dict__:
                del layer.forward
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._reset()

    def _reset(self) -> None:
        """A new forward pass: what an earlier one kept (without a backward) is dropped."""
        self._pending, self._arrived = [], 0

    def _record(self, layer: nn.Module, kept: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Keep ``kept`` (the input, or xhat for GroupNorm) and hook ``out``'s gradient."""
        if any(layer is seen for seen, _, _ in self._pending):
            raise ValueError("direct clipping: a layer used twice in one forward pass is not supported")
        if not out.requires_grad:
            out.requires_grad_(True)  # the first layer: its input needs no gradient, its output does
        slot: list[torch.Tensor | None] = [None]
        self._pending.append((layer, kept, slot))

        def on_grad(grad: torch.Tensor) -> None:
            slot[0] = grad
            self._arrived += 1
            if self._arrived == len(self._pending):
                self._clip()

        out.register_hook(on_grad)
        return out

    # ------------------------------------------------------------------ the maths

    def _clip(self) -> None:
        """Per-example norms over every layer, clip factors, clipped sums into ``p.grad``."""
        pending = self._pending
        batch = pending[0][1].shape[0]
        if batch == 0:  # an empty Poisson batch: a zero sum (the optimizer adds the noise)
            for layer, _, _ in pending:
                for param in layer.parameters(recurse=False):
                    if param.requires_grad:
                        param.grad = torch.zeros_like(param)
            self.last_norms = torch.zeros(0)
            self._reset()
            return
        per_layer = []  # (layer, kept, backprops * batch, squared norms [B])
        sq = torch.zeros(batch, dtype=pending[0][1].dtype)
        for layer, kept, (grad,) in pending:
            backprops = grad * batch  # d l_i / d out_i: the loss was a mean over the batch
            norms, state = _SQUARED_NORMS[type(layer)](layer, kept, backprops)
            sq = sq + norms
            per_layer.append((layer, kept, backprops, state))
        norms = sq.sqrt()
        factors = (self.max_grad_norm / (norms + _EPS)).clamp(max=1.0)
        for layer, kept, backprops, state in per_layer:
            for param, value in _CLIPPED_SUMS[type(layer)](layer, kept, backprops, state, factors):
                if param.requires_grad:
                    param.grad = value.detach().to(param.dtype)
        self.last_norms = norms.detach()
        self._reset()


def _direct_forward(original: Callable, clipping: DirectClipping) -> Callable:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return original(self, x)
        if type(self) is nn.Linear:
            if x.dim() != 2:
                raise ValueError(f"direct clipping: nn.Linear on {x.dim()}-d inputs is not supported")
            out = F.linear(x, self.weight.detach(), None if self.bias is None else self.bias.detach())
            return clipping._record(self, x.detach(), out)
        if type(self) is nn.Conv2d:
            out = F.conv2d(x, self.weight.detach(), None if self.bias is None else self.bias.detach(),
                           self.stride, self.padding, self.dilation, self.groups)
            return clipping._record(self, x.detach(), out)
        # GroupNorm: normalise with autograd (the input's gradient), the affine map by hand
        xhat = F.group_norm(x, self.num_groups, None, None, self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = xhat * self.weight.detach().view(shape) + self.bias.detach().view(shape)
        return clipping._record(self, xhat.detach(), out)

    return forward


# squared per-example norms [B] of a layer's parameter gradients, and what the sums reuse


def _linear_norms(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor):  # noqa: ANN202
    b_sq = (b * b).sum(dim=1)
    norms = b_sq * (a * a).sum(dim=1) if layer.weight.requires_grad else torch.zeros_like(b_sq)
    if layer.bias is not None and layer.bias.requires_grad:
        norms = norms + b_sq
    return norms, None


def _linear_sums(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor, state, c: torch.Tensor):  # noqa: ANN001, ANN202
    scaled = b * c[:, None]
    sums = [(layer.weight, scaled.t() @ a)]
    if layer.bias is not None:
        sums.append((layer.bias, scaled.sum(dim=0)))
    return sums


def _conv_norms(layer: nn.Conv2d, a: torch.Tensor, b: torch.Tensor):  # noqa: ANN202
    unfolded = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # [B, in*k*k, L]
    b_flat = b.flatten(2)  # [B, out, L]
    per_example = torch.bmm(b_flat, unfolded.transpose(1, 2))  # [B, out, in*k*k]
    norms = per_example.flatten(1).pow(2).sum(dim=1) if layer.weight.requires_grad else b.new_zeros(len(b))
    bias = b_flat.sum(dim=2)  # [B, out]
    if layer.bias is not None and layer.bias.requires_grad:
        norms = norms + bias.pow(2).sum(dim=1)
    return norms, (per_example, bias)


def _conv_sums(layer: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, state, c: torch.Tensor):  # noqa: ANN001, ANN202
    per_example, bias = state
    sums = [(layer.weight, torch.einsum("b,bok->ok", c, per_example).view_as(layer.weight))]
    if layer.bias is not None:
        sums.append((layer.bias, c @ bias))
    return sums


def _group_norms(layer: nn.GroupNorm, xhat: torch.Tensor, b: torch.Tensor):  # noqa: ANN202
    weight = (xhat * b).flatten(2).sum(dim=2)  # [B, C]
    bias = b.flatten(2).sum(dim=2)
    norms = b.new_zeros(len(b))
    if layer.weight.requires_grad:
        norms = norms + weight.pow(2).sum(dim=1)
    if layer.bias.requires_grad:
        norms = norms + bias.pow(2).sum(dim=1)
    return norms, (weight, bias)


def _group_sums(layer: nn.GroupNorm, xhat: torch.Tensor, b: torch.Tensor, state, c: torch.Tensor):  # noqa: ANN001, ANN202
    weight, bias = state
    return [(layer.weight, c @ weight), (layer.bias, c @ bias)]


_SQUARED_NORMS = {nn.Linear: _linear_norms, nn.Conv2d: _conv_norms, nn.GroupNorm: _group_norms}
_CLIPPED_SUMS = {nn.Linear: _linear_sums, nn.Conv2d: _conv_sums, nn.GroupNorm: _group_sums}


def without_gradient_copies(optimizer):  # noqa: ANN001, ANN201 (opacus DPOptimizerFastGradientClipping)
    """``optimizer`` (Opacus's ghost-mode ``DPOptimizerFastGradientClipping``, as made by
    ``make_private``) with an ``accumulate`` that takes ``p.grad`` as ``p.summed_grad``
    instead of ``copy.deepcopy``-ing it every step (a fifth of the remaining DP overhead on
    ``mlp-large``): :class:`DirectClipping` writes a fresh ``p.grad`` tensor per backward
    pass and nothing else holds it, and ``add_noise`` replaces ``p.grad`` by a new tensor,
    so sharing it is safe. Same arithmetic otherwise (noise, scaling, step hook)."""
    base = type(optimizer)
    optimizer.__class__ = type("DirectDPOptimizer", (base,), {"accumulate": _accumulate_in_place})
    return optimizer


def _accumulate_in_place(self) -> None:  # noqa: ANN001
    for p in self.params:
        if p.summed_grad is not None:
            p.summed_grad.add_(p.grad.data)
        else:
            p.summed_grad = p.grad.data
