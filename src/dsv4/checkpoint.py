"""Checkpoints: HF-format and DeepSeek's official layout, read and written with safetensors only.

Names. The model's own parameter names are the official ones (architecture.md section 10),
with routed experts stacked per layer. Any of these key styles loads:
- official: `layers.3.attn.wq_a.weight` (+ `.scale` sidecars for FP8/FP4), `mtp.0.*`;
- transformers in memory: `model.layers.3.self_attn.q_a_proj.weight`, `mlp.experts.gate_up_proj`;
- transformers' save_pretrained: `model.` + official-style leaves (`attn.norm` for `attn.kv_norm`).
`save_model` writes the transformers in-memory names plus `mtp.*` in official names (transformers
ignores those; we keep them). `convert_checkpoint` rewrites a checkpoint in either layout tensor by tensor,
with the same checks and tensors as `load_model` followed by `save_model` / `save_official`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from .config import HCA, Config, ConfigError
from .model.moe import PackedExperts
from .model.transformer import Transformer
from .quant import dequant_fp4_weight, dequant_fp8_weight, quant_fp4_weight, quant_fp8_weight


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not match its config; the message names the file/tensor."""


# official leaf (after `layers.N.`) <-> transformers leaf
_LAYER_LEAVES = [
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"), ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"), ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"), ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
]
_TOP = [("embed.weight", "model.embed_tokens.weight"), ("head.weight", "lm_head.weight"),
        ("norm.weight", "model.norm.weight"), ("hc_head_fn", "model.hc_head.hc_fn"),
        ("hc_head_base", "model.hc_head.hc_base"), ("hc_head_scale", "model.hc_head.hc_scale")]
_HF_TO_OFF_LEAF = {hf: off for off, hf in _LAYER_LEAVES}
_OFF_TO_HF_LEAF = dict(_LAYER_LEAVES)
_HF_TO_OFF_TOP = {hf: off for off, hf in _TOP}
_OFF_TO_HF_TOP = dict(_TOP)
_HF_TO_OFF_TOP.update({"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
                       "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"})
_LAYER = re.compile(r"^(layers\.\d+\.)(.*)$")
_EXPERT = re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.experts\.)(\d+)\.(w[123])\.(weight|scale)$")
_IGNORED = re.compile(r"(rotary_emb|inv_freq)")

# parameters kept in fp32 whatever the model dtype (the reference computes them in fp32)
_FP32 = re.compile(r"(hc_\w+_(fn|base|scale)$|attn_sink$|\.ape$|norm\.weight$|gate\.bias$|compressor\.w(kv|gate)\.weight$)")


_ATTN_SYNONYMS = {"q_a_proj": "wq_a", "q_b_proj": "wq_b", "kv_proj": "wkv", "gate_proj": "wgate", "o_a_proj": "wo_a",
                  "o_b_proj": "wo_b", "q_a_norm": "q_norm", "sinks": "attn_sink", "position_bias": "ape"}


def _attn_leaf(leaf: str) -> str | None:
    """An attention leaf spelled in any mix of official and transformers names -> the official leaf, or None.

    transformers' save_pretrained writes such mixes (`attn.compressor.indexer.gate_proj.weight`,
    `self_attn.norm.weight`): which of its renames it reverses depends on how the model was loaded."""
    first, *parts = leaf.split(".")
    if first not in ("attn", "self_attn") or not parts:
        return None
    parts = [_ATTN_SYNONYMS.get(p, p) for p in parts if p != "scorer"]
    if parts[:2] == ["compressor", "indexer"]:  # transformers nests the indexer (and its compressor) in the compressor
        rest = parts[2:]
        parts = ["indexer"] + (rest if rest[:1] in (["wq_b"], ["weights_proj"]) else ["compressor"] + rest)
    if len(parts) > 1 and parts[-2] in ("norm", "kv_norm"):  # kv_norm in attention, norm in a compressor
        parts[-2] = "norm" if "compressor" in parts else "kv_norm"
    name = "attn." + ".".join(parts)
    return name if name in _OFF_TO_HF_LEAF else None


def canonical_name(key: str) -> str | None:
    """Any supported checkpoint key -> official name (experts stay per-expert). None for keys to skip."""
    if _IGNORED.search(key):
        return None
    if key in _HF_TO_OFF_TOP:
        return _HF_TO_OFF_TOP[key]
    k = key[len("model."):] if key.startswith("model.") else key
    if k in _HF_TO_OFF_TOP:
        return _HF_TO_OFF_TOP[k]
    m = _LAYER.match(k)
    if m:
        prefix, leaf = m.groups()
        if leaf in _HF_TO_OFF_LEAF:
            return prefix + _HF_TO_OFF_LEAF[leaf]
        attn = _attn_leaf(leaf)
        if attn:
            return prefix + attn
        if leaf == "mlp.experts.gate_up_proj":
            return prefix + "ffn.experts.gate_up"
        if leaf == "mlp.experts.down_proj":
            return prefix + "ffn.experts.w2"
    return k


def _fp32_name(name: str) -> bool:
    return bool(_FP32.search(name))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _model_dtype(dtype) -> torch.dtype:
    """A floating-point torch dtype or its name -> the torch dtype."""
    if dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype: must be {', '.join(_DTYPES)} (a name or a torch dtype; got {dtype!r})")


def build_model(cfg: Config, dtype=torch.float32, device="cpu") -> Transformer:
    """An uninitialised model (parameter memory allocated, contents undefined) in `dtype`, fp32 where kept."""
    dtype = _model_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, p in model.named_parameters():
        if not _fp32_name(name):
            p.data = p.data.to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: share the embedding again
        model.head.weight = model.embed.weight
    return model


def init_random(model: Transformer, std: float = 0.02, seed: int | None = None) -> Transformer:
    """Random weights for tests and from-scratch training: normal matrices, unit norms and scales, zero biases."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "_scale")):
                p.fill_(1.0)
            elif name.endswith(("_base", "attn_sink", "gate.bias", ".ape")):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.zero_()
            elif name.endswith("tid2eid"):
                E = model.config.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[:b.shape[1]] for _ in range(b.shape[0])]))
    return model


# ---------------------------------------------------------------- reading

def _shard_files(path: Path) -> tuple[list[Path], dict | None]:
    """The weight files, and the index's tensor name -> shard file map where there is an index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files "
                                  f"(got {weight_map!r:.80})")
        for key, f in weight_map.items():
            # a shard is a file beside the index: a path would read outside the checkpoint
            if not isinstance(f, str) or not f or Path(f).name != f:
                raise CheckpointError(f"{index}: 'weight_map' entry '{key}' must name a shard file in {path} "
                                      f"(got {f!r})")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that are missing: {missing}")
        return [path / f for f in files], weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{path}: no .safetensors weights{hint}")
    return files, None


def _read_config(path: Path) -> Config:
    for name in ("config.json", "inference/config.json"):
        if (path / name).exists():
            return Config.from_file(path / name)
    raise CheckpointError(f"{path}: no config.json")


# safetensors' dtype names, in the order of its `Dtype` enum, the reverse of the order it lays tensors out in
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64"}
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(_SAFETENSORS_DTYPES)}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_QUANTISED = ("F8_E4M3", "I8")  # header dtypes of FP8 weights and packed FP4 experts: each has a `.scale`


def _open_shard(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


class _Piece(NamedTuple):
    """One checkpoint tensor as the loader takes it: canonical name, shard and key, and the (shard, key) of its
    scale where it is quantised."""
    name: str
    file: Path
    key: str
    scale: tuple[Path, str] | None = None


class _Source:
    """A checkpoint's tensors. Iterating lists them from the shard headers, shard by shard (a shard's header is
    read once the pieces before it are taken), FP8/FP4 weights paired with their scales (which may sit in
    another shard); `read` reads one tensor, `read_rows` one expert's rows of a stack of experts."""
    MAPPED_BYTES = 64 << 20  # read through one opening of a shard before it is opened again

    def __init__(self, path: Path, files: list[Path], weight_map: dict | None):
        self.path, self.files, self.weight_map = path, files, weight_map
        self._open: tuple[Path, object] | None = None  # the shard read last: reads mostly follow shard order
        self._mapped = 0  # bytes read through it
        self._headers: dict[Path, tuple[int, dict]] = {}  # shard -> where its data starts, its header

    def __iter__(self) -> Iterator[_Piece]:
        shard_of: dict[str, str] = {}  # checkpoint tensor name -> the shard it is read from
        weights, scales = {}, {}  # base name -> (shard, key), waiting for their partner
        for f in self.files:
            src = f.name
            with _open_shard(f) as h:
                pieces = []
                for key in h.keys():
                    name = canonical_name(key)
                    if name is None or self.weight_map is not None and self.weight_map.get(key, src) != src:
                        continue
                    if key in shard_of:
                        raise CheckpointError(f"{self.path}: tensor '{key}' is in two shards, {shard_of[key]} and "
                                              f"{src}; keep one copy, or list it in model.safetensors.index.json")
                    shard_of[key] = src
                    if name.endswith(".scale"):
                        scales[name[: -len(".scale")]] = (f, key)
                    elif name.endswith(".weight") and h.get_slice(key).get_dtype() in _QUANTISED:
                        weights[name[: -len(".weight")]] = (f, key)
                    else:
                        pieces.append(_Piece(name, f, key))
            yield from pieces
            for base in [b for b in weights if b in scales]:  # pairs may span shards
                yield _Piece(base + ".weight", *weights.pop(base), scale=scales.pop(base))
        unpaired = sorted(weights) + sorted(scales)
        if unpaired:
            raise CheckpointError(f"{self.path}: quantised weights without their scale (or scales without their "
                                  f"weight): {unpaired[:5]}")

    def has_mtp(self) -> bool:
        for f in self.files:
            with _open_shard(f) as h:
                if any(k.startswith("mtp.") for k in h.keys()):
                    return True
        return False

    def _shard(self, f: Path):
        # safetensors maps the shard, and the pages read count as resident memory until the mapping is closed: one
        # shard open at a time, and opened again (closing the mapping) every MAPPED_BYTES read (its header
        # parsed again: ~1 ms for a few hundred tensors, ~7 ms for 6,000)
        if self._open is None or self._open[0] != f or self._mapped > self.MAPPED_BYTES:
            self._open = None  # closes the last mapping before the next is made
            self._open, self._mapped = (f, _open_shard(f)), 0
        return self._open[1]

    def read(self, f: Path, key: str) -> torch.Tensor:
        h = self._shard(f)
        try:
            t = h.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: tensor '{key}' cannot be read ({e})") from None
        self._mapped += t.nbytes
        return t

    def _header(self, f: Path, key: str) -> tuple[int, dict]:
        """Where shard `f`'s data starts, and tensor `key`'s entry in its header (which safe_open checked)."""
        if f not in self._headers:
            with open(f, "rb") as h:
                n = int.from_bytes(h.read(8), "little")
                self._headers[f] = (8 + n, json.loads(h.read(n)))
        start, header = self._headers[f]
        return start, header[key]

    def shape(self, f: Path, key: str) -> tuple[int, ...]:
        return tuple(self._header(f, key)[1]["shape"])

    def read_rows(self, f: Path, key: str, e: int, rows: slice) -> torch.Tensor:
        """Rows `rows` of entry e of tensor `key` ([E, R, ...]) of shard `f`, read alone (safetensors' get_slice
        maps, or reads, the whole tensor)."""
        start, info = self._header(f, key)
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{f}: tensor '{key}' has dtype {info['dtype']}, which dsv4 does not read")
        shape = info["shape"]
        first, end, _ = rows.indices(shape[1])
        out = torch.empty((max(end - first, 0), *shape[2:]), dtype=dtype)
        row_bytes = math.prod(shape[2:]) * dtype.itemsize
        try:
            with open(f, "rb") as h:
                h.seek(start + info["data_offsets"][0] + (e * shape[1] + first) * row_bytes)
                got = h.readinto(out.view(-1).view(torch.uint8).numpy())
        except OSError as err:
            raise CheckpointError(f"{f}: tensor '{key}' cannot be read ({err})") from None
        if got != out.nbytes:
            raise CheckpointError(f"{f}: tensor '{key}' cannot be read (the file ends early)")
        return out


def _open_checkpoint(path, quant_simulation: bool = False) -> tuple[Path, Config, _Source]:
    """A checkpoint directory (or, where a save was killed between its renames, its whole `.old` twin), its
    validated config and its tensors' catalogue."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():  # a save killed between its renames: the previous model is whole there
        warnings.warn(f"{path} is missing; loading the previous save, {old}", stacklevel=3)
        path = old
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg = _read_config(path)
    cfg.quant_simulation = quant_simulation
    cfg.validate()
    source = _Source(path, *_shard_files(path))
    if cfg.num_nextn_predict_layers and not source.has_mtp():
        # transformers drops MTP weights on save; such a checkpoint loads without the MTP module
        warnings.warn(f"{path}: checkpoint has no mtp.* weights; loading without the MTP module", stacklevel=3)
        cfg.num_nextn_predict_layers = 0
    return path, cfg, source


class _Loader:
    """Checks checkpoint tensors and puts them in place in a pre-allocated model, or (`fill`) into new tensors
    for a few tensors of a model built on the meta device."""

    def __init__(self, model: Transformer):
        self.model = model
        # with tied embeddings `head.weight` is `embed.weight`: either name (or both, equal) loads it
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.params.update(dict(model.named_buffers()))
        self.tied = ("embed.weight", "head.weight") if model.config.tie_word_embeddings else ()
        self.loaded: set[str] = set()
        self.expert_seen: dict[str, set] = {}

    def _target(self, name: str, src: str, shape) -> torch.Tensor:
        t = self.params.get(name)
        if t is None:
            raise CheckpointError(f"{src}: tensor '{name}' has no place in this model (config mismatch?)")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{src}: tensor '{name}' has shape {tuple(shape)}, the config expects "
                                  f"{tuple(t.shape)}")
        return t

    def _check_finite(self, name, src, t):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{src}: tensor '{name}' contains NaN or Inf")

    def _check_expert_ids(self, name, src, t):
        # the hash router indexes the experts with these; a bad id fails only at the first forward
        E = self.model.config.n_routed_experts
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise CheckpointError(f"{src}: tensor '{name}' must hold integer expert ids (got fractions)")
        if t.numel() and not (0 <= t.min() and t.max() < E):
            raise CheckpointError(f"{src}: tensor '{name}' holds expert ids outside [0, {E}) "
                                  f"(min {t.min().item():g}, max {t.max().item():g})")

    def _experts(self, base: str, name: str, src: str) -> torch.nn.Module:
        """The routed-experts module `base` names (ends with '.')."""
        try:
            return self.model.get_submodule(base[:-1])
        except AttributeError:  # a layer (or MTP block) the config lacks
            raise CheckpointError(f"{src}: tensor '{name}' has no place in this model (config mismatch?)") from None

    def put(self, name: str, t: torch.Tensor, src: str) -> None:
        m = _EXPERT.match(name)
        if m:
            return self.put_expert(m.group(1), int(m.group(2)), m.group(3), t, src)
        if name.endswith("ffn.experts.gate_up"):
            self.check_gate_up(name, src, t.shape)
            base = name[: -len("gate_up")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                self.put_expert(base, e, "w1", t[e, :inter], src)
                self.put_expert(base, e, "w3", t[e, inter:], src)
            return
        if name.endswith("ffn.experts.w2") and t.dim() == 3:
            for e in range(t.shape[0]):
                self.put_expert(name[: -len("w2")], e, "w2", t[e], src)
            return
        dst = self._target(name, src, t.shape)
        self._check_finite(name, src, t)
        if name.endswith("tid2eid"):
            self._check_expert_ids(name, src, t)
        if name in self.tied and self.loaded & set(self.tied) and not torch.equal(dst, t.to(dst.dtype)):
            raise CheckpointError(f"{src}: tie_word_embeddings is true but the checkpoint's head.weight and "
                                  f"embed.weight differ; set tie_word_embeddings to false in config.json")
        with torch.no_grad():
            dst.copy_(t)
        self.loaded.add(name)
        if name in self.tied:
            self.loaded.update(self.tied)

    def check_gate_up(self, name: str, src: str, shape) -> None:
        if len(shape) != 3:
            raise CheckpointError(f"{src}: tensor '{name}' has shape {tuple(shape)}, expected "
                                  f"[experts, 2 * moe_intermediate_size, hidden_size]")

    def check_expert_index(self, name: str, e: int, src: str) -> None:
        if not 0 <= e < self.model.config.n_routed_experts:
            raise CheckpointError(f"{src}: expert index {e} out of range for '{name}' "
                                  f"({self.model.config.n_routed_experts} experts)")

    def put_expert(self, base: str, e: int, w: str, t: torch.Tensor | None, src: str, packed=None) -> None:
        name = f"{base}{w}"
        experts = self._experts(base, name, src)
        self.check_expert_index(name, e, src)
        if isinstance(experts, PackedExperts):
            if packed is None:
                raise CheckpointError(f"{src}: '{name}' expert {e} is not FP4-packed; fp4_experts=True needs an "
                                      f"official FP4 checkpoint")
            pairs = zip((getattr(experts, w + "_packed"), getattr(experts, w + "_scale")), packed)
        else:
            self._check_finite(f"{name}[{e}]", src, t)
            pairs = [(self.params[name], t)]
        for dst, v in pairs:
            if tuple(dst.shape[1:]) != tuple(v.shape):
                raise CheckpointError(f"{src}: '{name}' expert {e} has shape {tuple(v.shape)}, the config expects "
                                      f"{tuple(dst.shape[1:])}")
            if packed is not None and dst.dtype == torch.float8_e8m0fnu and v.dtype != dst.dtype:  # a float scale
                e8m0 = v.to(dst.dtype)
                if not torch.equal(e8m0.float(), v.float()):
                    raise CheckpointError(f"{src}: '{name}' expert {e} has scales that are not powers of two, which "
                                          f"fp4_experts=True keeps as UE8M0; load without fp4_experts")
                v = e8m0
            v = v.view(dst.dtype) if packed is not None else v
            if dst.dtype == torch.float8_e8m0fnu:  # byte 0xFF is UE8M0's NaN
                self._check_finite(f"{name}[{e}] scale", src, v.float())
            with torch.no_grad():
                dst[e].copy_(v)
        self.expert_seen.setdefault(name, set()).add(e)

    def put_quantised(self, wname: str, w: torch.Tensor, s: torch.Tensor, src: str) -> None:
        m = _EXPERT.match(wname)
        fmt = "FP4" if w.dtype == torch.int8 else "FP8"
        if s.dtype == torch.uint8:  # UE8M0 exponents stored as raw bytes (converters without an e8m0 dtype)
            s = s.view(torch.float8_e8m0fnu)
        elif not s.dtype.is_floating_point:
            raise CheckpointError(f"{src}: the scale of {fmt} tensor '{wname}' has dtype {s.dtype}; expected "
                                  f"float8_e8m0fnu (or its bytes as uint8) or a float type")
        if w.dim() != 2:  # block scales are per row and column block
            raise CheckpointError(f"{src}: {fmt} tensor '{wname}' has shape {tuple(w.shape)}, expected a matrix")
        if fmt == "FP4":  # packed routed expert
            if tuple(s.shape) != (w.shape[0], w.shape[1] // 16) or w.shape[1] % 16:
                raise CheckpointError(f"{src}: FP4 tensor '{wname}' {tuple(w.shape)} does not match its scale "
                                      f"{tuple(s.shape)} (expected one scale per 32 values)")
            if m and isinstance(self._experts(m.group(1), wname, src), PackedExperts):
                return self.put_expert(m.group(1), int(m.group(2)), m.group(3), None, src, packed=(w, s))
            dtype = self._dtype_for(wname)
            return self.put(wname, dequant_fp4_weight(w, s, dtype), src)
        exp = (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        if tuple(s.shape) != exp:
            raise CheckpointError(f"{src}: FP8 tensor '{wname}' {tuple(w.shape)} needs a {exp} block scale, "
                                  f"got {tuple(s.shape)}")
        self.put(wname, dequant_fp8_weight(w, s, 128, self._dtype_for(wname)), src)

    def _dtype_for(self, wname):
        m = _EXPERT.match(wname)
        key = f"{m.group(1)}{m.group(3)}" if m else wname
        t = self.params.get(key)
        return t.dtype if t is not None else torch.float32

    def load(self, piece: _Piece, source: _Source) -> None:
        """Read one checkpoint tensor (and its scale), check it and put it in place, dequantised."""
        t = source.read(piece.file, piece.key)
        if piece.scale is None:
            self.put(piece.name, t, piece.file.name)
        else:
            self.put_quantised(piece.name, t, source.read(*piece.scale), piece.file.name)

    def fill(self, names: list[str], pieces: list[_Piece], source: _Source, path: Path) -> dict[str, torch.Tensor]:
        """The model tensors `names` (of a model on the meta device) in new tensors, loaded from `pieces` and
        checked as load_model checks them. With tied embeddings `embed.weight` and `head.weight` are one tensor."""
        group: dict[str, torch.Tensor] = {}
        for n in names:
            tied = [group[m] for m in self.tied if m in group and n in self.tied]
            group[n] = tied[0] if tied else torch.empty(self.params[n].shape, dtype=self.params[n].dtype)
        skeleton = {n: self.params[n] for n in names}
        self.params.update(group)
        try:
            for piece in pieces:
                self.load(piece, source)
            self.check_filled(names, path)
        finally:
            self.params.update(skeleton)
        return group

    def read_expert(self, name: str, e: int, parts: list[_Part], source: _Source) -> torch.Tensor:
        """Expert e of the routed-expert weight `name` (of a model on the meta device) in a new tensor [out, in],
        read from `parts` (the last wins, as in load_model) and checked as load_model checks it."""
        base, w = name.rsplit(".", 1)
        skeleton = self.params[name]
        out = torch.empty(skeleton.shape[1:], dtype=skeleton.dtype)
        self.params[name] = out.expand(skeleton.shape)  # put_expert writes expert e into params[name][e]: into `out`
        try:
            for piece, rows, whole in parts:
                if rows is None:  # the expert's own tensor (FP8/FP4 ones dequantised)
                    self.load(piece, source)
                    continue
                t = source.read_rows(piece.file, piece.key, e, rows)
                if whole:
                    self._check_finite(name, piece.file.name, t)
                    out.copy_(t)
                else:
                    self.put_expert(base + ".", e, w, t, piece.file.name)
        finally:
            self.params[name] = skeleton
        return out

    def expected(self) -> set[str]:
        """The model tensors a checkpoint must fill; packed routed experts by their dense names."""
        expected = set(self.params)
        for mod_name, mod in self.model.named_modules():
            if isinstance(mod, PackedExperts):
                for w in ("w1", "w2", "w3"):
                    expected -= {f"{mod_name}.{w}_packed", f"{mod_name}.{w}_scale"}
                    expected.add(f"{mod_name}.{w}")
        return expected

    def check_filled(self, names, path: Path) -> None:
        """Refuse a checkpoint that left any of the model tensors `names` unfilled (routed experts: any expert)."""
        n_experts = self.model.config.n_routed_experts
        missing = sorted(n for n in names if n not in self.loaded and len(self.expert_seen.get(n, ())) != n_experts)
        if missing:
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise CheckpointError(f"{path}: checkpoint lacks tensors the config needs: {missing[:8]}{more}")


def _pack_experts(model: Transformer) -> None:
    cfg = model.config
    E, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    if d % 32 or inter % 32:
        raise ConfigError("fp4_experts needs hidden_size and moe_intermediate_size to be multiples of 32")
    for block in list(model.layers) + list(model.mtp):
        shapes = {"w1": (inter, d), "w2": (d, inter), "w3": (inter, d)}
        packed = {}
        for w, (o, i) in shapes.items():
            packed[f"{w}_packed"] = torch.zeros(E, o, i // 2, dtype=torch.int8)
            packed[f"{w}_scale"] = torch.zeros(E, o, i // 32, dtype=torch.float8_e8m0fnu)
        block.ffn.experts = PackedExperts(packed)


def load_model(path, dtype=torch.bfloat16, device="cpu", fp4_experts: bool = False,
               quant_simulation: bool = False) -> Transformer:
    """Load an HF-format or official DeepSeek-V4 checkpoint directory.

    Tensors are read one at a time into a pre-allocated model (peak memory about the model plus the
    largest tensor). dtype: float32, bfloat16, float16 or float64, as a torch dtype or its name
    (parameters the reference keeps in fp32 stay fp32). fp4_experts keeps official FP4 routed
    experts packed and dequantises them per use. quant_simulation turns on the reference's FP8/FP4
    quantisation points.
    Only safetensors are read."""
    path, cfg, source = _open_checkpoint(path, quant_simulation)
    model = build_model(cfg, dtype, "cpu")
    if fp4_experts:
        _pack_experts(model)
    loader = _Loader(model)
    for piece in source:
        loader.load(piece, source)
    loader.check_filled(loader.expected(), path)
    return model.to(device).eval()


# ---------------------------------------------------------------- writing

class _Stacked(NamedTuple):
    """A tensor to write whose bytes come in parts, tensors of its dtype in order (a block's routed experts
    stacked as transformers stores them, written expert by expert: the stack is never made)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: Iterator[torch.Tensor]


def _by_expert(*stacks) -> Iterator[torch.Tensor]:
    """Expert 0 of each of `stacks` ([E, ...] each), then expert 1 of each, ...: the bytes of their
    concatenation along dim 1."""
    for e in range(stacks[0].shape[0]):
        for t in stacks:
            yield t[e]


def _nbytes(t: torch.Tensor | _Stacked) -> int:
    return math.prod(t.shape) * t.dtype.itemsize


def _write_dir(path: Path, tensors, config: dict, max_shard_bytes: int, pattern: str) -> None:
    """Write (name, tensor or `_Stacked`) pairs as safetensors shards of at most `max_shard_bytes` (a larger
    tensor alone), each saved as soon as it is full, + index + config, as a whole new directory that replaces `path`
    (`replacing_dir`), keeping whatever else `path` holds (a tokenizer.json, subdirectories) but its old weights.
    `tensors` may read and convert as it goes: if it raises, `path` is left as it was."""
    path = Path(path)
    if Path.cwd().resolve().is_relative_to(path.resolve()):  # renaming it would pull the ground from under us
        raise ConfigError(f"{path}: save a model into a directory of its own, not the current one or above it")
    ours = ("model.safetensors.index.json", "config.json")
    with replacing_dir(path, keep=lambda name: not (name.endswith(".safetensors") or name in ours
                                                    or name.startswith(".tmp-"))) as tmp:
        shards: list[list[str]] = []  # the tensor names of each saved shard
        cur, size, total = {}, 0, 0
        for k, v in tensors:
            b = _nbytes(v)
            if cur and size + b > max_shard_bytes:
                shards.append(_save_shard(tmp / f".shard-{len(shards)}", cur))
                cur, size = {}, 0
            cur[k] = v
            size, total = size + b, total + b
        shards.append(_save_shard(tmp / f".shard-{len(shards)}", cur))
        names = (["model.safetensors"] if len(shards) == 1 else
                 [pattern.format(i + 1, len(shards)) for i in range(len(shards))])
        for i, fname in enumerate(names):  # the names are known once the count is
            (tmp / f".shard-{i}").rename(tmp / fname)
        if len(shards) > 1:
            weight_map = {k: fname for fname, keys in zip(names, shards) for k in keys}
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _save_shard(f: Path, tensors: dict[str, torch.Tensor | _Stacked]) -> list[str]:
    """One safetensors file, byte for byte what `safetensors.torch.save_file(tensors, f, {"format": "pt"})`
    writes (tensors by descending dtype, then name; the JSON header padded with spaces to 8 bytes), written
    tensor by tensor and a `_Stacked` part by part, so that no more than one part is copied at a time."""
    if sys.byteorder != "little":  # safetensors is little-endian; the bytes below are written as they lie in memory
        raise RuntimeError("writing safetensors needs a little-endian host")
    names = sorted(tensors, key=lambda k: (-_DTYPE_RANK[tensors[k].dtype], k))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in names:
        t = tensors[k]
        header[k] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with open(f, "wb") as out:
        out.write(len(head).to_bytes(8, "little") + head)
        for k in names:
            t, written = tensors[k], 0
            for part in t.parts if isinstance(t, _Stacked) else [t]:
                if part.dtype != t.dtype:
                    raise RuntimeError(f"'{k}' is {t.dtype}, a part of it {part.dtype}")
                data = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                out.write(data)
                written += data.nbytes
            if written != _nbytes(t):  # a file that says otherwise would be corrupt
                raise RuntimeError(f"'{k}' {tuple(t.shape)}: {written} bytes written, {_nbytes(t)} expected")
    return list(tensors)


@contextlib.contextmanager
def replacing_dir(path: Path, keep=None):
    """Yields an empty temporary directory beside `path` to fill; when the block ends, it replaces `path`
    whole: `path` is renamed to `path`.old, the temporary to `path`, and `path`.old removed. A kill at any
    point leaves the previous directory whole, in `path` or (between the renames) in `path`.old, where
    load_model and Checkpointed.resume look; the next call clears what a kill left behind.

    keep(name): whether an entry of the previous directory goes into the new one (as hard links)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a kill before the renames (one writer)
        shutil.rmtree(stale, ignore_errors=True)
    old = path.with_name(path.name + ".old")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        previous = path if path.is_dir() else old if old.is_dir() else None
        if keep is not None and previous is not None:
            for f in previous.iterdir():
                if keep(f.name):
                    _link_tree(f, tmp / f.name)
        if path.exists():
            if old.exists():  # `path` only ever appears whole, so an `old` beside it is a kill's leftover
                shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    """dst as a copy of src made of hard links (plain copies where the file system has none)."""
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        for f in src.iterdir():
            _link_tree(f, dst / f.name)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


class _Dequantised:
    """Packed FP4 routed experts (`PackedExperts`' packed [E, out, in/2] and scale [E, out, in/32]) seen as the
    stack [E, out, in] fp32, dequantised one expert at a time as it is indexed: `[e]` -> [out, in]."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor):
        self.packed, self.scale = packed, scale
        self.shape, self.dtype = (*packed.shape[:2], 2 * packed.shape[2]), torch.float32

    def __getitem__(self, e: int) -> torch.Tensor:
        return dequant_fp4_weight(self.packed[e], self.scale[e], torch.float32)


def _dense_state(model: Transformer) -> dict:
    """Official names, experts stacked; packed experts as `_Dequantised` (written one expert at a time)."""
    state, out = model.state_dict(), {}
    for name, t in state.items():
        m = re.match(r"^(.*\.experts)\.(w[123])_(packed|scale)$", name)
        if m:
            if m.group(3) == "packed":
                out[f"{m.group(1)}.{m.group(2)}"] = _Dequantised(t, state[f"{m.group(1)}.{m.group(2)}_scale"])
            continue
        out[name] = t
    return out


_HF_SHARDS, _OFFICIAL_SHARDS = "model-{:05d}-of-{:05d}.safetensors", "model{:05d}-of-{:05d}.safetensors"


def _to_hf(state: dict, tied: bool):
    """Model tensors (official names; routed experts stacked [E, out, in], as tensors or `_StreamedExperts`) ->
    (transformers name, tensor or `_Stacked`) pairs. A block's three routed-expert tensors come in one `state`:
    gate_up_proj [E, 2I, d] is w1 and w3 of each expert in turn, down_proj w2, both written expert by expert."""
    for name, t in state.items():
        if tied and name == "head.weight":  # tied embeddings are written once, as transformers does
            continue
        m = re.match(r"^(layers\.\d+\.)ffn\.experts\.(w[123])$", name)
        me = re.match(r"^(mtp\.\d+\.ffn\.experts)\.(w[123])$", name)
        if me:
            for e in range(t.shape[0]):
                yield f"{me.group(1)}.{e}.{me.group(2)}.weight", t[e]
        elif m:
            if m.group(2) == "w2":
                yield f"model.{m.group(1)}mlp.experts.down_proj", _Stacked(tuple(t.shape), t.dtype, _by_expert(t))
            elif m.group(2) == "w1":
                w3 = state[name[:-2] + "w3"]
                E, inter, d = t.shape
                yield (f"model.{m.group(1)}mlp.experts.gate_up_proj",
                       _Stacked((E, 2 * inter, d), t.dtype, _by_expert(t, w3)))
        elif name.startswith("mtp."):
            yield name, t.detach().cpu()
        elif name in _OFF_TO_HF_TOP:
            yield _OFF_TO_HF_TOP[name], t.detach().cpu()
        else:
            lm = _LAYER.match(name)
            if not lm or lm.group(2) not in _OFF_TO_HF_LEAF:
                raise CheckpointError(f"no transformers name for parameter '{name}'")
            yield f"model.{lm.group(1)}{_OFF_TO_HF_LEAF[lm.group(2)]}", t.detach().cpu()


def save_model(model: Transformer, path, max_shard_bytes: int = 2 << 30) -> None:
    """Write `model` in the transformers format (config.json + safetensors, sharded with an index).

    MTP weights are kept under `mtp.*` (official names); transformers ignores them on load. Tied
    embeddings are written once, as `model.embed_tokens.weight` (as transformers does)."""
    _write_dir(Path(path), _to_hf(_dense_state(model), model.config.tie_word_embeddings), model.config.to_hf_dict(),
               max_shard_bytes, _HF_SHARDS)


_OFFICIAL_FP32 = re.compile(r"(hc_\w+_(fn|base|scale)$|attn_sink$|\.ape$|gate\.bias$)")
_FP8_LEAVES = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]|e_proj|h_proj)"
                         r"\.weight$")


def _check_official(cfg: Config) -> None:
    """Refuse what the official config cannot say (before the long quantisation)."""
    if cfg.csa_compress_ratio != 4:
        raise ConfigError("the official layout marks CSA layers by compress ratio 4; csa_compress_ratio must be 4")
    if HCA in cfg.layer_types and cfg.hca_compress_ratio == 4:
        raise ConfigError("the official layout marks CSA layers by compress ratio 4; hca_compress_ratio must not be 4")
    if not cfg.norm_topk_prob:
        raise ConfigError("the official layout always normalises the routing weights; norm_topk_prob must be true")
    if (cfg.bos_token_id, cfg.eos_token_id) != (Config.bos_token_id, Config.eos_token_id):
        raise ConfigError(f"the official config cannot say bos_token_id {cfg.bos_token_id} and eos_token_id "
                          f"{cfg.eos_token_id} (it is read back with DeepSeek's {Config.bos_token_id} and "
                          f"{Config.eos_token_id}); save this model with save_model")


def _to_official(state: dict, fp8: bool, fp4_experts: bool):
    """Model tensors (official names; routed experts stacked [E, out, in], as tensors or `_StreamedExperts`) ->
    the official layout's (name, tensor) pairs, routed experts one at a time."""
    for name, t in state.items():
        m = re.match(r"^(.*\.ffn\.experts)\.(w[123])$", name)
        if m:
            for e in range(t.shape[0]):
                key = f"{m.group(1)}.{e}.{m.group(2)}"
                w = t[e].detach().cpu()
                if fp4_experts:
                    w, scale = quant_fp4_weight(w)
                    yield key + ".weight", w
                    yield key + ".scale", scale
                else:
                    yield key + ".weight", w.to(torch.bfloat16)
            continue
        t = t.detach().cpu()  # tied embeddings: head.weight is written too (the official config cannot say tied)
        if fp8 and _FP8_LEAVES.search(name):
            w, scale = quant_fp8_weight(t)
            yield name, w
            yield name[: -len(".weight")] + ".scale", scale
        elif t.dtype == torch.long:
            yield name, t
        else:
            yield name, t.float() if _OFFICIAL_FP32.search(name) else t.to(torch.bfloat16)


def _official_config(cfg: Config, fp8: bool, fp4_experts: bool) -> dict:
    """DeepSeek's inference/config.json for `cfg`."""
    return {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
            "moe_inter_dim": cfg.moe_intermediate_size, "n_hash_layers": cfg.num_hash_layers,
            "n_mtp_layers": cfg.num_nextn_predict_layers, "n_heads": cfg.num_attention_heads,
            "head_dim": cfg.head_dim, "rope_head_dim": cfg.qk_rope_head_dim, "q_lora_rank": cfg.q_lora_rank,
            "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank, "window_size": cfg.sliding_window,
            "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
            "index_topk": cfg.index_topk, "n_routed_experts": cfg.n_routed_experts,
            "n_activated_experts": cfg.num_experts_per_tok, "n_shared_experts": cfg.n_shared_experts,
            "score_func": cfg.scoring_func, "route_scale": cfg.routed_scaling_factor,
            "swiglu_limit": cfg.swiglu_limit, "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
            "hc_eps": cfg.hc_eps, "rope_theta": cfg.rope_theta, "compress_rope_theta": cfg.compress_rope_theta,
            "rope_factor": cfg.rope_factor, "original_seq_len": cfg.original_max_position_embeddings,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "max_seq_len": cfg.max_position_embeddings,
            "norm_eps": cfg.rms_norm_eps, "compress_ratios": cfg.compress_ratios,
            "dtype": "fp8" if fp8 else "bf16", "expert_dtype": "fp4" if fp4_experts else "bf16",
            "scale_fmt": "ue8m0"}


def save_official(model: Transformer, path, max_shard_bytes: int = 2 << 30, fp8: bool = True,
                  fp4_experts: bool = True) -> None:
    """Write DeepSeek's official layout: official names, FP8 weights with 128x128 UE8M0 scales, routed
    experts FP4 e2m1 packed two per byte with per-32 UE8M0 scales, int64 tid2eid, MTP weights,
    BF16 for the rest (fp32 where the reference keeps fp32), sharded with an index json. The official
    config cannot say that embeddings are tied: both tensors are written."""
    cfg = model.config
    _check_official(cfg)
    _write_dir(Path(path), _to_official(_dense_state(model), fp8, fp4_experts),
               _official_config(cfg, fp8, fp4_experts), max_shard_bytes, _OFFICIAL_SHARDS)


# ---------------------------------------------------------------- converting

_STACKED = re.compile(r"^(.*\.ffn\.experts)\.(gate_up|w[123])$")


def _group_of(name: str, tied) -> str:
    """The group a model tensor or checkpoint tensor (canonical name) is converted in: its block's routed experts
    (stacked in the model, per expert or gate_up in checkpoints), the embedding for a tied head, else itself."""
    m = _EXPERT.match(name) or _STACKED.match(name)
    if m:
        return m.group(1).rstrip(".")
    return "embed.weight" if name in tied else name


class _Part(NamedTuple):
    """Where a checkpoint holds one routed expert's weight: a checkpoint tensor, and unless it is the expert's own
    tensor the expert's `rows` in a stack [E, rows, in]; `whole` for a stack under the model's own name, which
    load_model checks as one tensor."""
    piece: _Piece
    rows: slice | None = None
    whole: bool = False


class _StreamedExperts:
    """A block's routed-expert weight `name` (`layers.N.ffn.experts.w1`, [E, out, in]) of a model on the meta
    device, read from the checkpoint one expert at a time: `[e]` reads and checks expert e (`_Loader.read_expert`)
    from where `parts[e]` says, [out, in]."""

    def __init__(self, loader: _Loader, source: _Source, name: str, parts: list[list[_Part]]):
        self.loader, self.source, self.name, self.parts = loader, source, name, parts
        self.shape, self.dtype = tuple(loader.params[name].shape), loader.params[name].dtype

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.loader.read_expert(self.name, e, self.parts[e], self.source)


def _stream_experts(loader: _Loader, source: _Source, group: str, pieces: list[_Piece]) -> dict:
    """Block `group`'s (`layers.N.ffn.experts`) routed-expert weights as `_StreamedExperts`, found from the
    checkpoint tensors' names and shard headers. Expert ids out of range and stacks of the wrong rank or shape
    are refused here; an expert's values as it is read."""
    n_experts = loader.model.config.n_routed_experts
    parts = {f"{group}.{w}": [[] for _ in range(n_experts)] for w in ("w1", "w2", "w3")}
    for piece in pieces:
        src = piece.file.name
        m = _EXPERT.match(piece.name)
        if m:  # one expert's tensor
            e = int(m.group(2))
            loader.check_expert_index(m.group(1) + m.group(3), e, src)
            parts[m.group(1) + m.group(3)][e].append(_Part(piece))
            continue
        shape, w = source.shape(piece.file, piece.key), piece.name.rsplit(".", 1)[1]
        if w == "gate_up":  # transformers' gate_up_proj [E, 2I, d]
            loader.check_gate_up(piece.name, src, shape)
            inter = shape[1] // 2
            stacked = {"w1": _Part(piece, slice(None, inter)), "w3": _Part(piece, slice(inter, None))}
        elif w == "w2" and len(shape) == 3:  # transformers' down_proj [E, d, I]
            stacked = {"w2": _Part(piece, slice(None))}
        else:  # the model's own stack
            loader._target(piece.name, src, shape)
            stacked = {w: _Part(piece, slice(None), whole=True)}
        for e in range(shape[0]):
            for w, part in stacked.items():
                loader.check_expert_index(f"{group}.{w}", e, src)
                parts[f"{group}.{w}"][e].append(part)
    return {name: _StreamedExperts(loader, source, name, p) for name, p in parts.items()}


def _plan(loader: _Loader, source: _Source, path: Path) -> list[Callable[[], dict]]:
    """The model's tensors in state_dict order, grouped as they are converted together: for each group, a function
    that returns its tensors by name, read from the checkpoint (a block's routed experts as `_StreamedExperts`,
    read as they are written). A checkpoint tensor with no place in the model, or a model tensor (or routed
    expert) with no checkpoint tensor, is refused here, before anything is written."""
    groups: dict[str, list[str]] = {}
    for name in loader.model.state_dict():
        groups.setdefault(_group_of(name, loader.tied), []).append(name)
    pieces: dict[str, list[_Piece]] = {g: [] for g in groups}
    for piece in source:
        group = _group_of(piece.name, loader.tied)
        if group not in pieces:
            loader.load(piece, source)  # says why it has no place, as load_model does
            raise CheckpointError(f"{piece.file.name}: tensor '{piece.name}' has no place in this model "
                                  f"(config mismatch?)")
        pieces[group].append(piece)
    experts = {g: _stream_experts(loader, source, g, pieces[g]) for g in groups if g.endswith(".ffn.experts")}
    missing = [n for g, names in groups.items() if g not in experts and not pieces[g] for n in names]
    missing += [n for streamed in experts.values() for n, t in streamed.items() if not all(t.parts)]
    loader.check_filled(missing, path)
    # a block's routed experts are read as they are written; any other group at once
    return [experts[g].copy if g in experts else partial(loader.fill, names, pieces[g], source, path)
            for g, names in groups.items()]


def convert_checkpoint(src, dst, to: str = "hf", dtype=torch.bfloat16, fp8: bool = True, fp4_experts: bool = True,
                       max_shard_bytes: int = 2 << 30) -> None:
    """Rewrite checkpoint `src` (either format) into `dst`: what save_model (`to="hf"`) or save_official
    (`to="official"`, with `fp8` and `fp4_experts`) writes for load_model(src, dtype), streamed. Tensors are read,
    converted and written as shards fill, routed experts one at a time (transformers' stacked gate_up_proj and
    down_proj are written expert by expert), so peak memory is about one output shard plus a few experts, not
    the model. `src` is refused where load_model refuses it (tensors missing or without a place before anything
    is written; bad shapes or values as they are read), and then `dst` is left as it was."""
    if to not in ("hf", "official"):
        raise ConfigError(f"to: must be 'hf' or 'official' (got {to!r})")
    path, cfg, source = _open_checkpoint(src)
    if to == "official":
        _check_official(cfg)
    loader = _Loader(build_model(cfg, dtype, "meta"))
    plan = _plan(loader, source, path)
    tied = cfg.tie_word_embeddings
    if to == "hf":
        convert, config, pattern = partial(_to_hf, tied=tied), cfg.to_hf_dict(), _HF_SHARDS
    else:
        convert = partial(_to_official, fp8=fp8, fp4_experts=fp4_experts)
        config, pattern = _official_config(cfg, fp8, fp4_experts), _OFFICIAL_SHARDS

    def tensors():  # one group alive at a time: each is dropped once converted
        for read in plan:
            yield from convert(read())
    _write_dir(Path(dst), tensors(), config, max_shard_bytes, pattern)
