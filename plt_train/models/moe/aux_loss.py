"""The gradient of the MoE auxiliary losses, in a form ``torch.compile`` can trace.

megatron-core attaches the load-balancing and z losses to a layer's activations with
``MoEAuxLossAutoScaler``: an identity in the forward pass whose backward gives the aux loss
the gradient ``main_loss_backward_scale``, a tensor kept as a class attribute that megatron's
schedule updates in place each micro-batch (``set_loss_scale``).  Dynamo cannot read an
attribute of an ``autograd.Function`` class (torch 2.13: "GetAttrVariable(
AutogradFunctionVariable(), main_loss_backward_scale) does not implement python_type()"), so
an MoE layer traced by torch.compile broke its graph there, six times per forward, besides its
dispatcher's host syncs (``models/compile.py``; compiled layers now keep the MoE MLP eager for
another reason, its recompilations, and a compiled dispatch will need this).

``AuxLossScaler`` is the same function with the scale handed in as an argument: the very
tensor megatron's class attribute holds (``bind_aux_loss_scale`` creates it on the model's
device before the first step, where megatron would create it in its first backward, and
megatron's later ``set_loss_scale`` calls copy into it).  The gradient is megatron's.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


class AuxLossScaler(torch.autograd.Function):
    """``output`` unchanged; in the backward pass ``aux_loss`` gets ``scale`` as its
    gradient (read when the backward runs, so megatron's in-place updates count)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale  # not saved: megatron updates it in place between forward and backward
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * ctx.scale, None


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor,
                    scale: torch.Tensor | None) -> torch.Tensor:
    """``output`` carrying ``aux_loss``'s gradient: ``AuxLossScaler`` with the bound ``scale``,
    megatron's own scaler for a layer nobody bound (built outside ``models.build_model``)."""
    if scale is None:
        return MoEAuxLossAutoScaler.apply(output, aux_loss)
    return AuxLossScaler.apply(output, aux_loss, scale)


def bind_aux_loss_scale(modules, device: torch.device) -> None:
    """Give every router in ``modules`` megatron's aux-loss scale tensor (``aux_loss_scale``),
    created on ``device`` (or moved there) first."""
    from plt_train.models.moe.layer import Router

    routers = [m for module in modules for m in module.modules() if isinstance(m, Router)]
    if not routers:
        return
    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    if scale is None or scale.device != device:
        start = torch.ones(1) if scale is None else scale.detach().cpu()
        MoEAuxLossAutoScaler.main_loss_backward_scale = start.to(device)
    for router in routers:
        router.aux_loss_scale = MoEAuxLossAutoScaler.main_loss_backward_scale
