"""Self-attention of a looped block: plain causal attention, or PLT's shared-KV G-SWA.

``LoopAttention`` is megatron-core's ``SelfAttention`` (same QKV / output projections, same
tensor-parallel head split, same checkpoint keys) with its core replaced:

- ``looped`` / ``vanilla`` models, and loop 1 of ``plt``: causal attention over the loop's own
  K/V.  PLT's loop 1 also leaves its (post-RoPE) K/V in the shared ``LoopState`` for the
  later loops of the same layer.
- ``plt`` with ``model.loop.shared_kv=false`` (cross-loop parallelism alone): every loop
  as in a looped model, causal over its own K/V.
- ``plt`` loops r >= 2 (G-SWA): ``y_global`` = causal attention over loop 1's K/V of this
  layer (detached or not, ``model.loop.detach_kv``); ``y_local`` = causal window-``w``
  attention over the loop's own K/V; ``y = g * y_global + (1 - g) * y_local`` per head with a
  zero-initialised sigmoid gate (``gate.py``).  With ``model.loop.gswa=false`` the later
  loops use ``y_global`` only.

In inference the same module reads and writes ``LoopState.cache`` (``inference.KVCache``):
looped models keep a full cache per loop; PLT keeps loop 1's full cache and a rolling
``w``-token cache per later loop (without shared K/V: a full cache per loop), and runs all
loops of a decode step as one batch.
"""
from __future__ import annotations

import functools
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from plt_train.config.schema import ModelConfig
from plt_train.kernels import use_triton
from plt_train.models.plt import ops
from plt_train.models.plt.gate import GATES
from plt_train.models.plt.state import LoopState


class LoopAttention(SelfAttention):
    """``model``: the decoder's ``ModelConfig`` (its ``loop`` options are read at every call,
    so a test or a benchmark may switch ``model.loop.kernel`` on a built model)."""

    def __init__(self, config, submodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, cp_comm_type=None, pg_collection=None,
                 model: ModelConfig | None = None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        if config.context_parallel_size != 1:
            raise ValueError("looped attention does not support context parallelism")
        if model is None:
            raise TypeError("LoopAttention needs model= (the ModelConfig; loop_attention_spec)")
        self.loops, self.opts = model.loops, model.loop
        self.parallel_loops = model.parallel_loops  # one-pass decode of all loops
        self.shares_kv = model.shares_kv  # later loops read loop 1's K/V
        self.scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.state = LoopState()  # replaced by the model's shared state
        if model.uses_gswa:
            self.gswa_gate = GATES[self.opts.gate](
                config, self.num_attention_heads_per_partition, self.hidden_size_per_attention_head)

    # -- megatron-core's SelfAttention interface -------------------------------------------
    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, **_unused):
        """hidden_states [s, b, h] (the normed layer input) -> (output [s, b, h], bias)."""
        q, k, v = self.get_query_key_value_tensors(hidden_states)
        if rotary_pos_emb is not None:
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            q = apply_rotary_pos_emb(q, freqs, config=self.config)
            k = apply_rotary_pos_emb(k, freqs, config=self.config)
        if self.state.decoding:
            y = self._decode(q, k, v, hidden_states)
        else:
            y = self._sequence(q, k, v, hidden_states)
        s, b = y.shape[:2]
        return self.linear_proj(y.reshape(s, b, -1))

    # -- whole sequences: training, evaluation, prefill --------------------------------------
    def _sequence(self, q, k, v, hidden_states):
        st, loop = self.state, self.state.row_loops[0]
        cache, valid = st.cache, st.key_valid
        if not self.shares_kv or loop == 0:
            if self.shares_kv:
                self._stash_shared_kv(k, v)
            if cache is not None and cache.has_full(loop):
                cache.store_full(loop, self.layer_number, k, v)
            return self._core(ops.causal_attention, q, k, v, scale=self.scale, key_valid=valid)
        k_shared, v_shared = self._shared_kv(loop)
        if cache is not None and self.opts.gswa:
            cache.store_window(loop, self.layer_number, k, v)
        if not self.opts.gswa:
            return self._core(ops.causal_attention, q, k_shared, v_shared, scale=self.scale,
                              key_valid=valid)
        g = self.gswa_gate(q, hidden_states)
        return self._core(self._gswa, q, k_shared, v_shared, k, v, g, valid=valid)

    def _gswa(self, q, k_shared, v_shared, k, v, g, valid=None):
        if valid is None and use_triton(self.opts.kernel, q.device):
            from plt_train.kernels import gswa  # imports Triton: only where it is selected

            if gswa.fused_applies(self.opts.kernel, q, valid):  # one pass, kernels/gswa.py
                return gswa.gswa_attention(q, k_shared, v_shared, k, v, g, self.scale,
                                           self.opts.window)
        return ops.gswa(q, k_shared, v_shared, k, v, g, self.scale, self.opts.window, valid)

    def _core(self, attend, *tensors, **options):
        """``attend(*tensors, **options)``, the attention proper.  Under selective recompute
        of ``core_attn`` (megatron's ``checkpoint_core_attention``) in training, what it
        saves for backward is dropped and recomputed in the backward pass, as megatron's
        ``Attention._checkpointed_attention_forward`` does for its core attention."""
        if self.checkpoint_core_attention and self.training and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(functools.partial(attend, **options), False,
                                              *tensors)
        return attend(*tensors, **options)

    def _stash_shared_kv(self, k, v):
        """Queue loop 1's K/V once for each later loop (a FIFO per (layer, loop)).

        Micro-batches go through each loop in order, also when pipeline parallelism keeps
        several in flight and interleaves loops (pipeline.py), so each later loop pops the
        oldest entry of its own queue.  When the loops are separate pipeline chunks with
        separate backward passes (later loops first), the later loops get leaf copies of K/V
        and a hook adds the gradient they collected to loop 1's own K/V gradient, which then
        flows on through loop 1's graph; otherwise the later loops' backward would run
        through loop 1's graph early and free it before loop 1's own backward.
        """
        if self.state.held is not None:  # under full recompute: the wrapper queues them
            self.state.held[self.layer_number] = (k, v)
            return
        if self.state.split_loops and not self.opts.detach_kv and k.requires_grad:
            k, v = (self._hand_over_grad(t) for t in (k, v))
        self.queue_shared_kv(k, v)

    @staticmethod
    def _hand_over_grad(t):
        leaf = t.detach().requires_grad_(True)
        t.register_hook(lambda g: g if leaf.grad is None else g + leaf.grad)
        return leaf

    def queue_shared_kv(self, k, v):
        """Queue (K, V) as they are for every later loop of this layer."""
        for loop in range(1, self.loops):
            self.state.shared_kv.setdefault((self.layer_number, loop), []).append((k, v))

    def _shared_kv(self, loop: int):
        """Loop 1's K/V of this layer for the sequence loop ``loop`` is processing."""
        if self.state.held is not None:  # under full recompute: handed in by the wrapper
            k, v = self.state.held.pop(self.layer_number)
        else:
            k, v = self.take_shared_kv(loop)
        if self.opts.detach_kv:
            k, v = k.detach(), v.detach()
        return k, v

    def take_shared_kv(self, loop: int):
        """Pop loop 1's queued (K, V) for ``loop`` (oldest first), as queued."""
        return self.state.shared_kv[(self.layer_number, loop)].pop(0)

    # -- one new position per sequence against the cache -----------------------------------
    def _decode(self, q, k, v, hidden_states):
        """Rows are loop-major groups of B sequences, one group per loop in ``row_loops``.

        Only device-side cache indexing (``KVCache.cursor``): no host sync, so the decode
        step can be captured in a CUDA graph (inference/generator.py)."""
        st, cache, lnum = self.state, self.state.cache, self.layer_number
        loops = st.row_loops
        n = len(loops)
        B = q.shape[1] // n
        if not self.parallel_loops:  # looped / vanilla: one loop per pass, its own full cache
            assert n == 1
            cache.append_full(loops[0], lnum, k, v)
            kc, vc, valid = cache.full_view(loops[0], lnum)
            return ops.cached_attention(q, kc, vc, self.scale, valid)
        assert loops == list(range(n)), loops
        if not self.shares_kv:  # cross-loop parallelism alone: each group its own full cache
            out = []
            for r in loops:
                rows = slice(r * B, (r + 1) * B)
                cache.append_full(r, lnum, k[:, rows], v[:, rows])
                kc, vc, valid = cache.full_view(r, lnum)
                out.append(ops.cached_attention(q[:, rows], kc, vc, self.scale, valid))
            return torch.cat(out, dim=1)
        # PLT: row group 0 is loop 1 and extends the shared cache; every row attends to it;
        # with G-SWA each later group also extends and attends to its loop's window.
        cache.append_full(0, lnum, k[:, :B], v[:, :B])
        kc, vc, valid = cache.full_view(0, lnum)
        window = {}
        if n > 1 and self.opts.gswa:
            cache.append_windows(lnum, k[:, B:], v[:, B:])
            kw, vw, wvalid = cache.windows(lnum, n - 1)
            window = dict(k_win=kw, v_win=vw, win_valid=wvalid,
                          gate=self.gswa_gate(q[:, B:], hidden_states[:, B:]))
        return self._fold_rows_into_heads(q, kc, vc, valid, window, cache.cursor)

    def _fold_rows_into_heads(self, q, kc, vc, valid, window: dict, cursor: torch.Tensor):
        """All rows of the step against loop 1's cache (and the windows) at once: in one
        Triton launch (plt_train/kernels/plt_decode.py) when ``model.loop.kernel`` picks it, else in
        the reference, which folds the rows into extra query heads of their KV group for ONE
        SDPA call (one query per head keeps the fast single-query decode path,
        docs/design/kernels.md)."""
        if use_triton(self.opts.kernel, q.device):
            from plt_train.kernels import plt_decode  # imports Triton: only where it is selected

            if plt_decode.kernel_applies(self.opts.kernel, q, kc):
                return plt_decode.plt_decode_attention(q, kc, vc, valid, self.scale,
                                                       cursor=cursor, **window)
        return ops.plt_decode_attention(q, kc, vc, valid, self.scale, **window)
