"""The two MoE layers, on megatron-core's ``MoELayer`` machinery.

Both reuse megatron-core 0.16.1 as shipped for the router (``TopKRouter``: softmax/sigmoid
top-k, capacity dropping, the load-balancing and z losses with their ``MoEAuxLossAutoScaler``
gradient and the aux-loss tracker) and the all-to-all token dispatcher
(``MoEAlltoAllTokenDispatcher``: permutation, split sizes over the expert-parallel group,
sorting by local expert).  We replace only:

* the experts: ``GroupedExperts`` (plain torch grouped GEMM; megatron's need TE or the
  grouped_gemm CUDA package);
* the dispatcher's two all-to-alls, routed through ``accounting.counted_all_to_all`` so every
  run reports the bytes and time on the wire;
* where the gate probabilities are applied: megatron sends each token's probability along with
  it in a second all-to-all and scales inside the expert.  We keep the probabilities at the
  source and apply them in the final un-permutation (the gate-weighted sum of the paper's
  DCCA, computed where the token lives), so only hidden states cross the wire and the bytes of
  DCCA are exactly r times those of CDAC.  ``y = sum_k p_k E_k(x)`` either way;
* at TP x EP = 1, megatron's sort of the received chunks by local expert and its inverse
  (``sort_chunks_by_idxs``: a split and a ``cat``), which there put every chunk back where it
  was: four copies of the routed tokens per forward+backward for nothing
  (``AccountedAlltoAllDispatcher.sorts_in_place``);
* the router's aux/z-loss token scaling, which in 0.16.1 shrinks those losses' gradients by
  1/TP under sequence parallelism (``Router``; Megatron-LM's later upstream fix), and the
  autograd function that attaches those losses' gradient (``aux_loss.py``: megatron's reads a
  class attribute torch.compile cannot trace);
* optionally, the number format on the wire (``model.moe.wire_format``: bf16, or fp8 dispatch
  as in DeepSeek-V3; ``wire.py``);
* with ``model.moe.dcca_kernel`` selecting Triton (``plt_train/kernels/dcca.py``): the
  un-permutation, a gate-weighted gather-sum kernel instead of megatron's scaled copy +
  ``scatter_add``; for BigMac also fused with the ascend projection, and the permutation
  fused with the descend projection.  The dispatcher's metadata (splits, tokens per expert,
  the sort by local expert after the all-to-all where it is not the identity) stays
  megatron's.

Capacity factor: megatron-core drops per SOURCE rank, before dispatch (capacity from the
rank's own tokens), so the expert-parallel size does not change which tokens drop (checked in
tests/distributed/test_moe_layer_parity.py); sequence parallelism does (each TP rank routes
1/TP of the tokens), as in Megatron-LM.

``FineGrainedMoE`` (CDAC): route on x, dispatch x (width h), experts ``h -> r*h -> h``,
combine at width h.  ``BigMacMoE`` (DCCA): route on the full-width x, ``x' = x W_down``
(h -> r*h, no bias), dispatch x' (width r*h), experts ``r*h -> h -> r*h``, combine and sum at
r*h, ``y = y' W_up`` (r*h -> h).  Shared experts (optional) run on the full-width x in both and
are added at the end, as in megatron-core's latent MoE.

Tensor parallelism: the layer needs sequence parallelism (megatron-core refuses MoE with
TP > 1 in training without it) and expert tensor parallel size 1: each TP rank routes its
slice of the sequence, the router and the projections are replicated (their gradients are
all-reduced over TP like the norms', via the ``sequence_parallel`` attribute).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import (
    save_to_aux_losses_tracker, unpermute, z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from plt_train.config.schema import KernelChoice, WireFormat
from plt_train.models.common.params import param_device
from plt_train.models.moe.accounting import A2ACounter, counted_all_to_all
from plt_train.models.moe.aux_loss import attach_aux_loss


def patch_megatron_moe() -> None:
    """Two fixes to megatron-core 0.16.1, applied on CPU and GPU alike (they are bugs in the
    package, not CPU workarounds), once, when this module is imported (below): every MoE
    layer is built from it.  Idempotent.

    * ``moe_utils`` binds ``te_general_gemm`` only when Transformer Engine imports, yet the
      router's GEMM tests ``te_general_gemm is not None``: a NameError without TE.  Binding it
      to None selects megatron's own torch.mm path.
    * ``TransformerLayer`` logs "Unknown MLP type" for any MLP class but its own; ours get the
      process groups from ``parallel_state`` like megatron's defaults, so the warning is noise.
    """
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _OurMLPFilter) for f in layer_logger.filters):
        layer_logger.addFilter(_OurMLPFilter())


class _OurMLPFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


patch_megatron_moe()


class Router(TopKRouter):
    """megatron-core's ``TopKRouter`` with its auxiliary-loss gradients made independent of the
    TP / CP size under ``calculate_per_token_loss`` (which we always use).

    In 0.16.1 the load-balancing and z losses are multiplied by the rank's LOCAL token count
    before ``MoEAuxLossAutoScaler``, while ``finalize_model_grads`` divides by the global token
    count; with sequence parallelism each TP rank holds 1/TP of the tokens, so the effective
    coefficient becomes coeff / TP (measured: the router gradient at TP=2 is exactly half of
    TP=1's; tests/distributed/test_moe_layer_parity.py).  Megatron-LM fixed this upstream by
    scaling with ``tp_cp_group.size()`` (NVIDIA/Megatron-LM PR #5047, "Fix MoE aux_loss /
    z_loss gradient scaling with TP > 1"); this is that fix, for the two loss types we expose.
    """

    # Training-mode calls since the last reset: the denominator of the logged aux losses (a
    # looped model runs each layer R times per micro-batch).  metrics.MoEStepMetrics.
    calls = 0
    # megatron's aux-loss gradient scale, bound by models.build_model (aux_loss.py).
    aux_loss_scale: Optional[torch.Tensor] = None

    def forward(self, input, padding_mask=None):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
        return super().forward(input, padding_mask=padding_mask)

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        """megatron's, with the token count of the whole TP x CP group (the fix above) and
        the gradient attached by ``aux_loss.attach_aux_loss`` (traceable by torch.compile)."""
        if self.calculate_per_token_loss and reduce_group is self.tp_cp_group:
            local = activation.shape[0] if valid_token_count is None else valid_token_count
            valid_token_count = local * self.tp_cp_group.size()
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker(aux_loss_name, aux_loss / aux_loss_coeff, self.layer_number,
                                   num_layers, reduce_group=reduce_group,
                                   reduce_group_has_dp=reduce_group_has_dp)
        if self.calculate_per_token_loss:
            tokens = activation.shape[0] if valid_token_count is None else valid_token_count
            aux_loss = aux_loss * tokens
        return attach_aux_loss(activation, aux_loss, self.aux_loss_scale)

    def apply_z_loss(self, logits, padding_mask=None):
        if not (self.calculate_per_token_loss and self.config.moe_z_loss_coeff is not None
                and self.training and torch.is_grad_enabled()):
            return super().apply_z_loss(logits, padding_mask=padding_mask)
        # megatron's own code path, with the token count of the whole TP x CP group.
        coeff = self.config.moe_z_loss_coeff / self.tp_cp_group.size()
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)
        local = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
        logits = attach_aux_loss(logits, z_loss * local * self.tp_cp_group.size(),
                                 self.aux_loss_scale)
        # Logged as the mean over the whole TP x CP group's tokens, averaged over DP (megatron
        # logs the last rank's local value, which then depends on the layout).
        size = self.tp_cp_group.size()
        save_to_aux_losses_tracker("z_loss", z_loss / coeff / size, self.layer_number,
                                   self.config.num_layers, reduce_group=self.tp_cp_group)
        return logits


class AccountedAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher with counted all-to-alls and the probabilities applied
    at the source after the combine (see the module docstring), in ``wire_format``
    (``model.moe.wire_format``, ``wire.py``), counted in ``counter``: both set by the layer."""

    wire_format = WireFormat.native
    counter: A2ACounter | None = None
    # (dest, slot_probs) of kernels/dcca.expert_slots while the fused kernels run this forward
    # (set in the layer's preprocess, used by the combine), else None.
    slots = None

    def token_dispatch(self, permuted_tokens, permuted_probs):
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_ep_alltoall", self.tokens_per_expert)
        tokens = counted_all_to_all(self.ep_group, permuted_tokens, self.output_splits,
                                    self.input_splits, "dispatch", self.wire_format,
                                    self.counter)
        return tokens, None  # the probabilities stay here

    def token_combine(self, hidden_states, *_args, **_kwargs):
        return counted_all_to_all(self.ep_group, hidden_states, self.input_splits,
                                  self.output_splits, "combine", self.wire_format,
                                  self.counter)

    # -- permutation 2 (the sort by local expert after the all-to-all) ----------------------
    def sorts_in_place(self) -> bool:
        """Whether megatron's permutation 2 is the identity here: at TP x EP = 1 the one
        source rank's chunks already arrive in local-expert order, yet 0.16.1 still splits
        them and ``cat``s them back (one copy of the routed tokens forward, one more in the
        combine's inverse, and both again in the backward: at the issue's BigMac shape,
        4 x 134 MB read and written per layer; the fine-grained layer's combine side is at
        full width, 4x that).  With padding to capacity megatron's own reshape is already
        free; with TE's fused permute there is no split/cat."""
        return (self.tp_size * self.ep_size == 1 and not self.drop_and_pad
                and not self.config.moe_permute_fusion)

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        """megatron's ``dispatch_postprocess`` at TP x EP = 1 minus the identity sort: the
        shared experts' hook and the same host syncs (tokens per expert on the host), then
        the tokens as they came."""
        if not self.sorts_in_place():
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(global_input_tokens)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_permutation_2", self.tokens_per_expert)
        tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_finish", self.tokens_per_expert)
        self.tokens_per_expert = None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        """The inverse sort, skipped where ``sorts_in_place`` (no TP reduce-scatter either:
        TP = 1 there)."""
        if self.sorts_in_place():
            return hidden_states
        return super().combine_preprocess(hidden_states)

    def combine_postprocess(self, permuted_tokens):
        """Un-permute with the gate-weighted sum: ``out[t] = sum_k p[t, e_k] * y[t, e_k]``,
        by the gather-sum kernel when the fused kernels run, else megatron's ``unpermute``."""
        if self.slots is not None:
            from plt_train.kernels.dcca import combine

            (dest, slot_probs), self.slots = self.slots, None
            output = combine(permuted_tokens, slot_probs, dest, rows_covered=True)
            return output.view(self.hidden_shape)
        output = unpermute(
            permuted_tokens, self.reversed_local_input_permutation_mapping,
            restore_shape=self.hidden_shape_before_permute, probs=self.probs,
            routing_map=self.routing_map, fused=False, drop_and_pad=self.drop_and_pad)
        return output.view(self.hidden_shape)

    # -- the fused kernels (plt_train/kernels/dcca.py) ---------------------------------------
    def remember_slots(self, routing_map, probs) -> None:
        """Each token's rows in the permuted order and their gate probabilities, for the fused
        combine; computed on the device from the routing map (no host sync)."""
        from plt_train.kernels.dcca import expert_slots

        self.slots = expert_slots(routing_map, probs, self.config.moe_router_topk)

    def permutes_as_slots(self) -> bool:
        """Whether megatron's permutation here is one row per routed (token, expert) pair,
        at most top-k per token, which the fused DCCA ops assume: not with padding to
        capacity (padding rows, more than top-k rows per token), router padding for
        quantisation, or TE's fused permute."""
        return not (self.drop_and_pad or self.config.moe_router_padding_for_quantization
                    or self.config.moe_permute_fusion)

    def descend_dispatch_preprocess(self, hidden_states, routing_map, probs, w_down):
        """``dispatch_preprocess`` of ``hidden_states W_down^T``, the projection fused into
        the permutation: the same metadata steps, then ``descend_permute`` writes each latent
        token straight to its rows in expert order.  Returns (permuted latent, None): the
        probabilities stay at the source (``token_dispatch``)."""
        from plt_train.kernels.dcca import descend_permute

        self.probs, self.routing_map = probs, routing_map
        tokens = hidden_states.view(-1, hidden_states.shape[-1])
        self.hidden_shape = (*hidden_states.shape[:-1], w_down.shape[0])
        self.tokens_per_expert = self.preprocess(routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_permutation_1", self.tokens_per_expert)
        # num_out_tokens: T * top_k dropless; with dropping, the routed-pair count, already on
        # the host after megatron's "before_permutation_1" sync (index_select would sync too).
        self.remember_slots(routing_map, probs)
        permuted = descend_permute(tokens, w_down, self.slots[0], int(self.num_out_tokens),
                                   rows_covered=True)
        return permuted, None

    def combine_ascend_postprocess(self, permuted_tokens, w_up):
        """``combine_postprocess`` then ``W_up``, fused: gate-weighted gather-sum of each
        token's rows, then the ascend GEMM.  Returns [*, h]."""
        from plt_train.kernels.dcca import combine_ascend

        (dest, slot_probs), self.slots = self.slots, None
        output = combine_ascend(permuted_tokens, slot_probs, dest, w_up, rows_covered=True)
        return output.view(*self.hidden_shape[:-1], w_up.shape[0])


class FineGrainedMoE(MoELayer):
    """CDAC: DeepSeekMoE-style fine-grained experts ``h -> r*h -> h`` (module docstring).
    ``wire_format`` (``model.moe.wire_format``): the all-to-all's number format, ``wire.py``.
    ``dcca_kernel`` (``model.moe.dcca_kernel``): auto / triton / torch for the fused kernels of
    ``plt_train/kernels/dcca.py`` (``uses_fused_kernels``); same outputs and gradients either
    way.  ``a2a`` counts this layer's all-to-all bytes and time (``accounting.py``)."""

    def __init__(self, config, submodules: MoESubmodules, layer_number: Optional[int] = None,
                 pg_collection=None, wire_format: str = WireFormat.native,
                 dcca_kernel: str = KernelChoice.auto):
        if config.expert_tensor_parallel_size != 1:
            raise ValueError("our MoE layers need expert_tensor_parallel_size=1")
        wire_format, dcca_kernel = WireFormat(wire_format), KernelChoice(dcca_kernel)
        pg_collection = pg_collection or moe_utils.get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        self.a2a = A2ACounter()
        self.token_dispatcher = AccountedAlltoAllDispatcher(
            self.num_local_experts, self.local_expert_indices, config=self.config,
            pg_collection=pg_collection)
        self.token_dispatcher.wire_format = wire_format
        self.token_dispatcher.counter = self.a2a
        self.dcca_kernel = dcca_kernel
        self.fused_kernels = False  # chosen per forward in preprocess, used by postprocess

    def uses_fused_kernels(self, hidden_states) -> bool:
        """``model.moe.dcca_kernel`` for this call: the fused ops (plt_train/kernels/dcca.py) when
        Triton is selected for the device and the dispatcher permutes one row per routed pair;
        otherwise megatron's permute / unpermute.  Checked before anything imports Triton,
        which CPU installs may lack."""
        from plt_train.kernels import use_triton, verified

        device = hidden_states.device
        if not (self.token_dispatcher.permutes_as_slots()
                and use_triton(self.dcca_kernel, device)):
            return False
        if self.dcca_kernel == "triton":
            return True
        from plt_train.kernels import dcca  # auto: once per process, a check against the reference
        return verified("dcca", device, dcca.self_check)

    def preprocess(self, hidden_states, probs, routing_map):
        self.fused_kernels = self.uses_fused_kernels(hidden_states)
        self.token_dispatcher.slots = None
        permuted = self.token_dispatcher.dispatch_preprocess(hidden_states, routing_map, probs)
        if self.fused_kernels:  # megatron's permute (a plain gather); the combine is fused
            self.token_dispatcher.remember_slots(routing_map, probs)
        return permuted


class _Projection(torch.nn.Module):
    """A bias-free linear map replicated on every rank (BigMac's descend / ascend)."""

    def __init__(self, config, in_features: int, out_features: int, init_method):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features,
                                                     dtype=config.params_dtype,
                                                     device=param_device(config)))
        init_method(self.weight)
        # Under sequence parallelism each TP rank sees its own tokens: the gradient is partial
        # and is all-reduced over TP by finalize_model_grads, like the norms' and the router's.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class BigMacMoE(FineGrainedMoE):
    """DCCA: descend, communicate, communicate, ascend (module docstring).

    ``linear_descend`` (h -> r*h) and ``linear_ascend`` (r*h -> h) are ONE projection each per
    layer, shared by all experts.  Initialised like megatron-core's latent-MoE projections:
    normal(0, std), the ascend (an output of the residual branch) scaled by 1/sqrt(2L).
    With the fused kernels (``uses_fused_kernels``) the descend projection is fused with the
    permutation and the gate-weighted combine with the ascend projection.
    """

    def __init__(self, config, submodules: MoESubmodules, layer_number: Optional[int] = None,
                 pg_collection=None, latent_size: int = 0,
                 dcca_kernel: str = KernelChoice.auto, wire_format: str = WireFormat.native):
        super().__init__(config, submodules, layer_number, pg_collection, wire_format,
                         dcca_kernel)
        if latent_size <= 0:
            raise ValueError("BigMacMoE needs latent_size = r * hidden_size > 0")
        self.latent_size = latent_size
        self.linear_descend = _Projection(config, config.hidden_size, latent_size,
                                          config.init_method)
        self.linear_ascend = _Projection(config, latent_size, config.hidden_size,
                                         config.output_layer_init_method)

    def preprocess(self, hidden_states, probs, routing_map):
        # The router already saw the full-width x.
        self.fused_kernels = self.uses_fused_kernels(hidden_states)
        self.token_dispatcher.slots = None
        if self.fused_kernels:
            return self.token_dispatcher.descend_dispatch_preprocess(
                hidden_states, routing_map, probs, self.linear_descend.weight)
        latent = self.linear_descend(hidden_states)
        return self.token_dispatcher.dispatch_preprocess(latent, routing_map, probs)

    def postprocess(self, output, shared_expert_output):
        if self.fused_kernels:
            output = self.token_dispatcher.combine_ascend_postprocess(
                output, self.linear_ascend.weight)
        else:
            output = self.token_dispatcher.combine_postprocess(output)  # gate-weighted, r*h
            output = self.linear_ascend(output)
        if shared_expert_output is not None:
            output = output + shared_expert_output
        return output


__all__ = ["AccountedAlltoAllDispatcher", "BigMacMoE", "FineGrainedMoE", "Router",
           "patch_megatron_moe"]
