"""One decode step over fixed buffers, captured in a CUDA graph and replayed per token.

Decode is launch-bound at small batch: a step of a 16-layer model is hundreds of small
kernels, each costing host time to launch.  A CUDA graph replays them all with one launch,
provided the step has fixed shapes and addresses and no host sync: the KV cache is
preallocated and indexed through device tensors (``KVCache.cursor``), and the step reads its
inputs (token, position, fed-on loop outputs) from the buffers held here.

The step writes the new fed-on outputs back into the input buffers at its end, so passing
the returned ``fed`` to the next call costs no copy.  Before capture, warm-up steps run on a
side stream (Triton compiles, lazy initialisations, allocator warm-up); each re-runs the
same step from restored inputs, which rewrites the same cache entries, so they leave the
cache as one step would.  With ``capture=False`` the same buffers and copies run eagerly:
that is the path the CPU tests compare with the plain eager step.
"""
from __future__ import annotations

import torch


class StaticDecodeStep:
    def __init__(self, step, cache, token, position, fed, *, capture: bool, warmup: int = 2):
        """``step(token, position, fed, cache) -> (logits, new fed)``, device work only."""
        self.step, self.cache, self.capture = step, cache, capture
        self.token, self.position = token.clone(), position.clone()
        self.fed = [f.clone() for f in fed]
        self.graph = self.logits = None
        if capture:
            self._capture(warmup)

    def __call__(self, token, position, fed):
        """-> (logits, fed): both the buffers of this step (the logits are rewritten by the
        next call; ``fed`` is what to pass next time)."""
        self._load(token, position, fed)
        if self.graph is None:
            return self._run(), self.fed
        self.graph.replay()
        return self.logits, self.fed

    def _run(self):
        logits, fed = self.step(self.token, self.position, self.fed, self.cache)
        for dst, src in zip(self.fed, fed):
            dst.copy_(src)
        return logits

    def _load(self, token, position, fed):
        for dst, src in zip((self.token, self.position, *self.fed), (token, position, *fed)):
            if src is not dst:
                dst.copy_(src)

    def _capture(self, warmup: int):
        inputs = (self.token.clone(), self.position.clone(), [f.clone() for f in self.fed])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._load(*inputs)
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()
        self._load(*inputs)  # the capture ran nothing; the first replay starts from these
