"""KV-cached generation for the looped decoders, with PLT's one-pass decode step.

- Prefill is the training-style forward over the (left-padded) prompts; it fills the caches
  and keeps, per sequence, the last position's output of every non-final loop.
- Decode, ``vanilla`` / ``looped``: the R loops of a new position run one after another
  (loop r needs loop r-1's output at the same position), each against its own full cache.
- Decode, ``plt``: every loop's input is already known (loop 1: the new token's embedding;
  loop r: that embedding plus loop r-1's output at the PREVIOUS position), so the R rows go
  through the shared block as ONE batch of R*B rows; row R gives the logits, rows 1..R-1 are
  kept for the next step.
- A decode step has fixed shapes and indexes the cache through device tensors only, so on
  CUDA it is captured once per cache in a CUDA graph and replayed per token
  (``cuda_graph``, ``static_step.py``); the attention of a PLT layer's R rows can be one
  Triton launch (``model.loop.kernel``, plt_train/kernels/plt_decode.py).

Greedy (temperature 0) or temperature + top-p (nucleus) sampling; prompts of different
lengths are left-padded and masked, with RoPE positions counted from each prompt's start.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from plt_train.config.schema import Switch
from plt_train.inference.cache import KVCache
from plt_train.inference.static_step import StaticDecodeStep


@dataclass
class Generation:
    tokens: list  # generated token ids per prompt (stopped at eos when given)
    step_logits: torch.Tensor  # [B, new_tokens, vocab]: the logits each new token came from
    prompt_logits: torch.Tensor  # [B, T0, vocab] prefill logits (left-padded layout)
    pad: list  # left padding of each prompt in prompt_logits
    kv_bytes: int


CUDA_GRAPH_CHOICES = tuple(c.value for c in Switch)  # auto | on | off


class Generator:
    """KV-cached generation for one process.

    ``cuda_graph``: ``on`` captures one decode step in a CUDA graph per cache and replays it
    for every token (static buffers, no host sync; see ``inference/static_step.py``);
    ``off`` runs it eagerly; ``auto`` = on for CUDA unless the model has MoE layers, whose
    token routing syncs with the host (per-expert token counts) and so cannot be captured;
    off on CPU.  ``static`` runs the graph's buffers and copies without capturing (what the
    CPU tests compare with the eager step).

    MoE layers route dropless here, whatever ``model.moe.capacity_factor`` says: megatron-core
    applies the capacity in eval mode too, over all the tokens of a call, so a prompt's logits
    would depend on the other prompts of the batch, on padding, and (in PLT's one pass) on
    the other loops' rows.  Capacity is a training device for balance and speed; at
    inference each token gets its top-k experts (as in DeepSeek's and Mixtral's serving).
    """

    def __init__(self, model, cuda_graph: str = "auto"):
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_world_size() != 1 or \
                ps.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("generation runs on one process (TP=1, PP=1)")
        self.model = model.eval()
        self.kind, self.loops = model.kind, model.loops
        self.trained_as = model.kind  # "gpt" when a GPTModel's weights are decoded (as_decoder)
        self.one_pass = model.parallel_loops  # PLT: every loop of a step in one batched pass
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.cuda_graph = cuda_graph
        self.step_mode = step_mode(cuda_graph, model, self.device)  # eager | static | graph
        self._static = None  # the StaticDecodeStep of the current cache
        self._moe_configs = list({id(c): c for c in (getattr(mod, "config", None)
                                                     for mod in model.modules())
                                  if getattr(c, "moe_expert_capacity_factor", None)
                                  is not None}.values())

    @contextmanager
    def _dropless(self):
        """Capacity off for the duration of a call (the model may go on training after)."""
        saved = [c.moe_expert_capacity_factor for c in self._moe_configs]
        for c in self._moe_configs:
            c.moe_expert_capacity_factor = None
        try:
            yield
        finally:
            for c, factor in zip(self._moe_configs, saved):
                c.moe_expert_capacity_factor = factor

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        attn = self.model.decoder.layers[0].self_attention
        if self.model.shares_kv:  # later loops keep a window (with G-SWA), no full cache
            full, windows = [0], list(range(1, self.loops)) if self.model.opts.gswa else []
        else:  # looped, vanilla, and PLT without shared K/V: a full cache per loop
            full, windows = list(range(self.loops)), []
        window = self.model.opts.window if windows else 0
        return KVCache(batch=batch, max_len=max_len,
                       layer_numbers=[l.layer_number for l in self.model.decoder.layers],
                       kv_heads=attn.num_query_groups_per_partition,
                       head_dim=attn.hidden_size_per_attention_head, full_loops=full,
                       window_loops=windows, window=window, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, cache: KVCache):
        """tokens/valid [B, T0] (left-padded) -> (logits [B, T0, V], fed-on loop outputs)."""
        m = self.model
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        cache.valid[:, :tokens.shape[1]] = valid
        rope = m.rope_at(positions, cache.max_len)
        with self._dropless():
            hidden, fed = m.run_loops(m.embed(tokens, positions), rope, key_valid=valid,
                                      cache=cache)
        m.loop_state.begin()
        cache.advance(tokens.shape[1])
        return m.head(hidden), [f[-1:] for f in fed]

    @torch.no_grad()
    def decode(self, token: torch.Tensor, position: torch.Tensor, fed: list, cache: KVCache):
        """One new token per sequence (token/position [B]) -> (logits [B, V], fed)."""
        cache.check_room()  # here, not in the step: a CUDA graph's replay skips Python
        with self._dropless():
            return self._decode(token, position, fed, cache)

    def _decode(self, token, position, fed, cache: KVCache):
        if self.step_mode == "eager":
            logits, fed = self.decode_step(token, position, fed, cache)
        else:
            static = self._static
            if static is None or static.cache is not cache:
                self._static = None  # free the old graph's memory before capturing anew
                try:
                    static = self._static = StaticDecodeStep(
                        self.decode_step, cache, token, position, fed,
                        capture=self.step_mode == "graph")
                except Exception as exc:
                    if self.cuda_graph != "auto":
                        raise
                    # auto never breaks generation: a step this stack cannot capture (a
                    # kernel or layer with a host sync we did not foresee) runs eagerly.
                    warnings.warn(f"decode step not capturable ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); decoding eagerly")
                    self.step_mode = "eager"
                    return self._decode(token, position, fed, cache)
            logits, fed = static(token, position, fed)
            logits = logits.clone()  # the graph's output buffer is rewritten by each replay
        cache.advance()
        return logits, fed

    def decode_step(self, token, position, fed, cache: KVCache):
        """The device work of a decode step at ``cache.cursor``: fixed shapes, no host sync
        (so it can be captured in a CUDA graph); ``decode`` advances the cache after it."""
        m, R, B = self.model, self.loops, token.shape[0]
        cache.begin_step()
        emb = m.embed(token[:, None], position[:, None])  # [1, B, h]
        rope = m.rope_at(position[:, None], cache.max_len)  # [1, B, 1, d]
        state = m.loop_state
        if self.one_pass:
            rows = [emb] + [m.cross_loop_input(emb, f) for f in fed]  # the shift: last step's
            state.begin(cache=cache, decoding=True)
            state.row_loops = list(range(R))
            out = m.run_block(torch.cat(rows, dim=1), rope.repeat(1, R, 1, 1))
            outs = out.view(1, R, B, -1).unbind(1)
            fed = [m.between_loops(o) for o in outs[:-1]]
            hidden = outs[-1]
        else:
            x = emb
            for r in range(R):
                state.begin(r, cache=cache, decoding=True)
                hidden = m.run_block(x, rope)
                if r < R - 1:
                    x = m.between_loops(hidden)
        state.begin()
        return m.head(hidden)[:, -1], fed

    def _left_pad(self, prompts: list):
        """Token lists -> (tokens [B, T0], valid [B, T0], each row's left padding)."""
        B, T0 = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) < 1:
            raise ValueError("every prompt needs at least one token")
        pad = [T0 - len(p) for p in prompts]
        tokens = torch.zeros(B, T0, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, T0, dtype=torch.bool, device=self.device)
        for b, p in enumerate(prompts):
            tokens[b, pad[b]:] = torch.tensor(p, dtype=torch.long)
            valid[b, pad[b]:] = True
        return tokens, valid, pad

    @torch.no_grad()
    def logits(self, sequences: list) -> tuple:
        """Token lists -> (logits [B, T0, V] of the left-padded batch, each row's padding):
        the prefill alone, which scores sequences (lm-eval's loglikelihood) as the training
        forward does, each row as if it were alone."""
        tokens, valid, pad = self._left_pad(sequences)
        logits, _ = self.prefill(tokens, valid, self.new_cache(len(sequences), tokens.shape[1]))
        return logits, pad

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None) -> Generation:
        tokens, valid, pad = self._left_pad(prompts)
        B, T0 = tokens.shape
        cache = self.new_cache(B, T0 + max_new_tokens)
        prompt_logits, fed = self.prefill(tokens, valid, cache)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        position = torch.tensor([len(p) for p in prompts], device=self.device)
        logits, steps, out = prompt_logits[:, -1], [], []
        for i in range(max_new_tokens):
            steps.append(logits)
            nxt = sample(logits, temperature, top_p, gen)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, fed = self.decode(nxt, position + i, fed, cache)
        new = torch.stack(out, dim=1).tolist()
        if eos_id is not None:
            new = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in new]
        return Generation(tokens=new, step_logits=torch.stack(steps, dim=1),
                          prompt_logits=prompt_logits, pad=pad, kv_bytes=cache.kv_bytes())


def step_mode(cuda_graph: str, model, device) -> str:
    """``Generator(cuda_graph=...)`` -> how decode steps run: eager, static or graph."""
    if cuda_graph not in (*CUDA_GRAPH_CHOICES, "static"):
        raise ValueError(f"cuda_graph={cuda_graph!r}: one of {', '.join(CUDA_GRAPH_CHOICES)}")
    moe = bool(getattr(model.config, "num_moe_experts", None))
    cuda = torch.device(device).type == "cuda"
    if cuda_graph == "on":
        if not cuda:
            raise ValueError("cuda_graph=on needs a CUDA device (use auto or off)")
        if moe:
            raise ValueError("cuda_graph=on: MoE layers route tokens with host syncs "
                             "(per-expert token counts), which a CUDA graph cannot capture; "
                             "use auto or off")
    if cuda_graph == "static":
        return "static"
    if cuda_graph == "on" or (cuda_graph == "auto" and cuda and not moe):
        return "graph"
    return "eager"


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen) -> torch.Tensor:
    """[B, V] -> [B]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def decoding_config(model):
    """The ``ModelConfig`` the generator decodes for a trained ``model``: itself, or for
    ``gpt`` (megatron's ``GPTModel``) the ``vanilla`` decoder.  The two have the same
    parameters under the same names and compute the same function (a one-loop
    ``LoopedGPTModel`` is a ``GPTModel`` whose block runs once; checked by
    ``tests/inference/test_generator.py::test_gpt_weights_decode_as_vanilla``), so a gpt
    checkpoint loads into it unchanged and gets the KV-cached decode.  (Megatron-LM decodes
    GPTModel through its own inference engine; ours keeps one decoder for every family.)"""
    from dataclasses import replace

    from plt_train.config.schema import ModelName

    return replace(model, name=ModelName.vanilla) if model.name == ModelName.gpt else model


def as_decoder(model, model_cfg=None):
    """``model`` itself when the generator can decode it, else (a ``GPTModel``, with its
    ``model_cfg``) a vanilla decoder holding its weights."""
    if hasattr(model, "run_block") or model_cfg is None:
        return model
    from plt_train.models.plt.model import LoopedGPTModel

    twin = LoopedGPTModel(decoding_config(model_cfg), model.config, model.vocab_size)
    twin.load_state_dict(model.state_dict())  # strict: the same names and shapes
    return twin.to(next(model.parameters()).device)


def sample_after_training(chunks, tokenizer, sample_cfg, model_cfg=None) -> str | None:
    """Decode ``sample_cfg.prompt``'s continuation with the trained model (None when this
    layout cannot generate in place; ``plt-generate`` can from the checkpoint).  A gpt model
    (``model_cfg`` given) is decoded through its vanilla twin (``decoding_config``)."""
    from megatron.core import parallel_state as ps

    trained = getattr(chunks[0], "module", chunks[0])
    if len(chunks) != 1 or ps.get_tensor_model_parallel_world_size() != 1 or \
            ps.get_pipeline_model_parallel_world_size() != 1:
        return None
    model = as_decoder(trained, model_cfg)
    if not hasattr(model, "run_block"):
        return None
    # Eager steps: a one-off sample does not repay a capture, and capturing inside a training
    # process risks clashing with its NCCL watchdog's event queries.
    gen = Generator(model, cuda_graph="off")
    out = gen.generate([tokenizer.tokenize(sample_cfg.prompt)], sample_cfg.max_new_tokens,
                       sample_cfg.temperature, sample_cfg.top_p, sample_cfg.seed,
                       eos_id=tokenizer.eod)
    trained.train()
    return tokenizer.detokenize(out.tokens[0])
