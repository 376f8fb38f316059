"""megatron-core's ``RowParallelLinear`` with its tensor-parallel group passed on.

megatron-core 0.16.1's ``RowParallelLinear.forward`` calls the linear with ``tp_group=None``,
which makes ``get_tensor_model_parallel_group_if_none`` issue a ``DeprecationWarning`` on every
call on rank 0 and then look up the same default group this layer already holds.  Harmless in
eager mode, but ``torch.compile`` cannot trace a ``warnings.warn`` with a warning class, so
every row-parallel linear would break a compiled layer's graph in two (``model.compile``).
Passing ``self.tp_group`` is what megatron does itself one layer up (the reduce after it) and
what the fetched default is for a non-expert layer; the group is not used by the linear's
backward here anyway (no dgrad all-reduce, no sequence-parallel gather).
"""
from __future__ import annotations

from megatron.core.tensor_parallel import RowParallelLinear as _MegatronRowParallelLinear


class RowParallelLinear(_MegatronRowParallelLinear):
    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)
