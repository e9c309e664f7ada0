"""The batched decode step compiled ahead of time (torch.export + AOTInductor).

Under torch.compile the step spent more time around its kernels than in them: at batch 1, ~0.9 ms of
kernels against ~0.4 ms of dynamo guards and argument gathering (the model's ~300 parameters are graph
inputs) and ~1.1 ms in inductor's Python wrapper (~380 buffer allocations, ~290 size checks and ~270
tensor views per call). Exported once and compiled by AOTInductor, the same kernels run from a C++
wrapper, and the model's weights are bound once as the artifact's constants (shared, not copied).

One artifact for batch 1 and one for every larger batch, each built on first use from that call's
inputs (batch size, pool rows and each layer's entry count are dynamic dimensions), shared by all
engines over the same model, and kept in inductor's cache directory under a hash of the exported
program (less its source locations), thread count and processor, so a later process only re-exports
(seconds) and loads it.
"""
from __future__ import annotations

import hashlib
import os
import types
import warnings
import weakref

import torch
import torch.utils._pytree as pytree
from torch._inductor.cpu_vec_isa import pick_vec_isa
from torch._inductor.runtime.cache_dir_utils import cache_dir

OPTIONS = {"aot_inductor.package_constants_in_so": False,  # constants: the model's own tensors, bound at load
           # one-row matrix products as fused multiply-reduce kernels rather than BLAS calls
           "post_grad_fusion_options": {"decompose_mm_pass": {}}}


_STEPS = weakref.WeakKeyDictionary()


def compiled(model, fn) -> AOTStep:
    """`fn` (model/decode.py's `_core`) compiled for `model`: one AOTStep per model, whatever the engine."""
    if model not in _STEPS:
        _STEPS[model] = AOTStep(fn)
    return _STEPS[model]


class AOTStep:
    """`step(model, pool, ids, pos, slots, entries)`: `fn` (same signature and results) run from its
    AOTInductor artifact for this model and pool layout."""

    def __init__(self, fn):
        self.fn = fn
        # per compressor, in the order its tensors are passed: (layer, "comp" | "index", its open-window
        # tensors' names); each also has one entries tensor (compressed entries, or the indexer's keys)
        self.layout = None
        self.runners = {}  # batched (N > 1) -> (artifact's loader, its outputs' places, the tensors it reads)

    def __call__(self, model, pool, ids, pos, slots, entries):
        if self.layout is None:
            self.layout = [(i, name, sorted(getattr(pool, name)[i]))
                           for i in range(len(model.layers)) for name in ("comp", "index")
                           if getattr(pool, name)[i] is not None]
        args = (ids, pos, slots) + self._flat(pool, entries)
        batched = ids.shape[0] > 1
        if batched not in self.runners:
            self.runners[batched] = self._build(model, args, batched)
        loader, (at, per_layer), _ = self.runners[batched]
        # the loader directly: the packaged model's __call__ re-parses its input and output specs every call
        out = loader.boxed_run([ids, pos, slots, *args[3], *args[4], *args[5]])
        return out[at], [tuple(out[j] for j in js) for js in per_layer]

    def _flat(self, pool, entries) -> tuple:
        """The pool and the entries as flat tensor lists: (window rings, open-window states, entries)."""
        states = [getattr(pool, name)[i][k] for i, name, keys in self.layout for k in keys]
        return list(pool.window), states, [t for e in entries if e is not None for t in e]

    def _build(self, model, args, batched: bool):
        """Export `fn` with these example inputs, compile it (or find it in the cache) and load it."""
        N = torch.export.Dim("batch", min=2) if batched else None
        S = torch.export.Dim("rows", min=2)
        row = {0: N} if batched else None
        entries, T = [], {}  # a layer's entries and indexer keys share their row count
        for i, _, _ in self.layout:
            a = model.layers[i].attn
            T.setdefault(i, torch.export.Dim(f"entries{i}", min=a.indexer.topk if a.indexer is not None else 1))
            entries.append({0: N, 1: T[i]} if batched else {1: T[i]})
        shapes = (row, row, row, [{0: S}] * len(args[3]), [{0: S}] * len(args[4]), entries)
        module = _Step(model, self.fn, self.layout)
        ropes = [block.attn.rope for block in model.layers]
        freqs = [r.inv_freq for r in ropes]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # `forward` points each Rope at its traced buffer; torch.export warns about that assignment
                warnings.filterwarnings("ignore", "The tensor attributes .* were assigned during export")
                warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation
                ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        finally:
            for r, f in zip(ropes, freqs):
                r.inv_freq = f
        # the generated code also depends on the thread count and the processor it was compiled for
        dev = args[0].device
        target = (str(pick_vec_isa()) if dev.type == "cpu" else
                  torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev))
        # the program without its source-location comments: the same graph from another checkout or after
        # an unrelated edit shares the artifact
        program = "\n".join(line for line in str(ep).splitlines() if not line.lstrip().startswith("#"))
        key = "\n".join((torch.__version__, repr(OPTIONS), str(torch.get_num_threads()), target, program))
        key = hashlib.sha256(key.encode()).hexdigest()[:40]
        path = os.path.join(cache_dir(), "dsv4-decode", key + ".pt2")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path[:-4]}.{os.getpid()}.tmp.pt2"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # a copy: the call adds its own settings to the dict (which would change later keys)
                torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs=dict(OPTIONS))
            os.replace(tmp, path)  # whole or absent: a crash mid-compile leaves no half-written artifact
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation, on load
            runner = torch._inductor.aoti_load_package(path)
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        tensors = {k: tensors[k] for k in runner.get_constant_fqns()}
        runner.load_constants(tensors, check_full_update=True, user_managed=True)
        # where each result sits in the flat outputs: (logits, [per layer a tuple of emitted tensors])
        spec = pytree.treespec_loads(runner.loader.get_call_spec()[1])
        at, per_layer = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        return runner.loader, (at, per_layer), tensors


class _Step(torch.nn.Module):
    """The step over flat tensor lists, as torch.export takes it. Each layer's RoPE frequencies (plain
    tensors on its Rope) are registered here as buffers, so they become named constants of the artifact."""

    def __init__(self, model, fn, layout: list):
        super().__init__()
        self.model, self.fn, self.layout = model, fn, layout
        device = next(self.model.parameters()).device
        for i, block in enumerate(self.model.layers):
            rope = block.attn.rope
            rope.inv_freq = rope.inv_freq.to(device)  # where `cos_sin` would move it on first use
            self.register_buffer(f"inv_freq{i}", rope.inv_freq, persistent=False)

    def forward(self, ids, pos, slots, windows, states, entries):
        L = len(self.model.layers)
        pool = types.SimpleNamespace(window=list(windows), comp=[None] * L, index=[None] * L)
        per_layer = [None] * L  # None, (entries,) or (entries, indexer keys)
        states, entries = iter(states), iter(entries)
        for i, name, keys in self.layout:
            getattr(pool, name)[i] = {k: next(states) for k in keys}
            per_layer[i] = (per_layer[i] or ()) + (next(entries),)
        for i, block in enumerate(self.model.layers):
            block.attn.rope.inv_freq = getattr(self, f"inv_freq{i}")  # the traced buffer (restored by the caller)
        return self.fn(self.model, pool, ids, pos, slots, per_layer)
