"""The one DeepSeek-V4 configuration, readable from both config.json styles.

HF style: transformers' `config.json` (`model_type: deepseek_v4`), with either
`layer_types` + `compress_rates` or the legacy `compress_ratios` / `num_hash_layers`
/ `rope_scaling` fields that published checkpoints ship.
Official style: DeepSeek's `inference/config.json` (ModelArgs names: `dim`, `n_layers`, ...).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


def is_int(v, least: int) -> bool:
    """An integer (not a bool) >= least."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def is_number(v, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> bool:
    """A finite int or float (not a bool) in [low, high], or [low, high) when high_open."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v
            and (v < high if high_open else v <= high))


def check_fields(section: str, checks) -> None:
    """checks: (field, value, ok, what it must be). The first failing one -> ConfigError naming it."""
    for name, value, ok, what in checks:
        if not ok:
            raise ConfigError(f"config {section} {name}: must be {what} (got {value!r})")


@dataclass
class Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # attention schedule: one entry per main layer; the MTP layer is always sliding
    layer_types: list = field(default_factory=list)
    csa_compress_ratio: int = 4
    hca_compress_ratio: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # MoE
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # RoPE: plain on sliding/MTP layers, YaRN on compressed layers
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0  # YaRN factor; 1.0 disables YaRN
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    # Reproduce the official reference's quantisation points (architecture.md section 8):
    # FP8 quant-dequant of KV nope dims, Hadamard + FP4 on the indexer q/k. Runtime option.
    quant_simulation: bool = False

    def __post_init__(self):
        if not self.layer_types and is_int(self.num_hidden_layers, 1):  # else validate names num_hidden_layers
            self.layer_types = [SLIDING] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        self.validate()

    # ---- derived ----
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def compress_ratio(self, layer: int) -> int:
        """0 for sliding-only layers (and the MTP layer, index num_hidden_layers)."""
        if layer >= self.num_hidden_layers:
            return 0
        t = self.layer_types[layer]
        return {SLIDING: 0, CSA: self.csa_compress_ratio, HCA: self.hca_compress_ratio}[t]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def compress_ratios(self) -> list:
        """Official-style schedule, len L+1 (last entry: the MTP layer)."""
        return [self.compress_ratio(i) for i in range(self.num_hidden_layers + 1)]

    # ---- validation ----
    def validate(self) -> None:
        def need(cond, name, msg):
            if not cond:
                raise ConfigError(f"config field '{name}': {msg} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                     "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                     "n_routed_experts", "num_experts_per_tok", "hc_mult", "hc_sinkhorn_iters",
                     "csa_compress_ratio", "hca_compress_ratio", "max_position_embeddings",
                     "original_max_position_embeddings"):
            need(is_int(getattr(self, name), 1), name, "must be a positive integer")
        for name in ("rms_norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "rope_factor",
                     "routed_scaling_factor", "swiglu_limit", "beta_fast", "beta_slow"):
            v = getattr(self, name)
            need(is_number(v) and v > 0, name, "must be a positive number")
        for name in ("norm_topk_prob", "tie_word_embeddings", "quant_simulation"):
            need(isinstance(getattr(self, name), bool), name, "must be true or false")
        need(is_int(self.qk_rope_head_dim, 1) and self.qk_rope_head_dim % 2 == 0
             and self.qk_rope_head_dim <= self.head_dim,
             "qk_rope_head_dim", f"must be a positive even integer <= head_dim ({self.head_dim})")
        need(self.index_head_dim % 2 == 0 and self.index_head_dim >= self.qk_rope_head_dim,
             "index_head_dim", f"must be even and >= qk_rope_head_dim ({self.qk_rope_head_dim})")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"must divide num_attention_heads ({self.num_attention_heads})")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"must be <= n_routed_experts ({self.n_routed_experts})")
        need(is_int(self.n_shared_experts, 0) and self.n_shared_experts <= 1, "n_shared_experts", "must be 0 or 1")
        need(is_int(self.num_hash_layers, 0), "num_hash_layers", "must be a non-negative integer")
        need(is_int(self.num_nextn_predict_layers, 0) and self.num_nextn_predict_layers <= 1,
             "num_nextn_predict_layers", "must be 0 or 1")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"needs one entry per layer (num_hidden_layers={self.num_hidden_layers})")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        need(not bad, "layer_types", f"entries must be in {LAYER_TYPES}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            need(is_int(v, 0) and v < self.vocab_size, name, f"must be an integer token id below vocab_size "
                 f"({self.vocab_size})")
        if self.quant_simulation:
            need(self.nope_head_dim % 64 == 0, "quant_simulation",
                 "needs head_dim - qk_rope_head_dim to be a multiple of 64 (FP8 block)")
            need(self.index_head_dim & (self.index_head_dim - 1) == 0 and self.index_head_dim % 32 == 0,
                 "quant_simulation", "needs index_head_dim a power of two and a multiple of 32 (Hadamard, FP4)")

    # ---- presets ----
    @classmethod
    def flash(cls, **kw) -> "Config":
        types = [SLIDING, SLIDING] + [CSA, HCA] * 20 + [CSA]
        return cls(**{**dict(layer_types=types), **kw})

    @classmethod
    def pro(cls, **kw) -> "Config":
        types = [HCA, HCA] + [CSA, HCA] * 29 + [CSA]
        base = dict(hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61, num_attention_heads=128,
                    q_lora_rank=1536, o_groups=16, index_topk=1024, n_routed_experts=384,
                    routed_scaling_factor=2.5, layer_types=types)
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, **kw) -> "Config":
        """A small config using every architectural piece; for tests and quick experiments."""
        base = dict(vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                    num_attention_heads=4, head_dim=64, qk_rope_head_dim=16, q_lora_rank=32, o_groups=2,
                    o_lora_rank=16, sliding_window=16, layer_types=[SLIDING, CSA, HCA, CSA],
                    hca_compress_ratio=16, index_n_heads=4, index_head_dim=32, index_topk=8,
                    n_routed_experts=8, num_experts_per_tok=2, num_hash_layers=1,
                    original_max_position_embeddings=512, max_position_embeddings=8192)
        return cls(**{**base, **kw})

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Read an HF config.json or an official inference/config.json dict."""
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object")
        if "dim" in d or "n_layers" in d:
            return cls._from_official(d)
        return cls._from_hf(d)

    @classmethod
    def from_file(cls, path) -> "Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def _from_hf(cls, d: dict) -> "Config":
        mt = d.get("model_type", "deepseek_v4")
        if mt != "deepseek_v4":
            raise ConfigError(f"config field 'model_type': expected 'deepseek_v4' (got {mt!r})")
        for name, types, what in (("compress_rates", dict, "an object"), ("layer_types", (list, tuple), "a list"),
                                  ("mlp_layer_types", (list, tuple), "a list"), ("rope_scaling", dict, "an object"),
                                  ("rope_parameters", dict, "an object")):
            if d.get(name) is not None and not isinstance(d[name], types):
                raise ConfigError(f"config field '{name}': must be {what} (got {d[name]!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: d[k] for k in names if k in d and k not in ("layer_types",)}
        rates = d.get("compress_rates") or {}
        for key, attr in ((CSA, "csa_compress_ratio"), (HCA, "hca_compress_ratio")):
            if key in rates:
                kw[attr] = rates[key]
        for legacy, attr in (("compress_rate_csa", "csa_compress_ratio"), ("compress_rate_hca", "hca_compress_ratio")):
            if legacy in d:
                kw[attr] = d[legacy]
        n = _layer_count(kw)
        if d.get("layer_types"):
            kw["layer_types"] = list(d["layer_types"])[:n]
        elif d.get("compress_ratios") is not None:
            kw.update(_types_from_ratios(d["compress_ratios"], n, kw.get("csa_compress_ratio", 4)))
        if d.get("mlp_layer_types"):
            kw["num_hash_layers"] = _hash_layers_from_types(d["mlp_layer_types"])
        prf = d.get("partial_rotary_factor")
        if prf and "qk_rope_head_dim" not in d:
            if not is_number(prf, 0, 1):
                raise ConfigError(f"config field 'partial_rotary_factor': must be a number in (0, 1] (got {prf!r})")
            head_dim = kw.get("head_dim", cls.head_dim)
            if is_int(head_dim, 1):  # a bad head_dim is named by validate
                kw["qk_rope_head_dim"] = round(head_dim * prf)
        rope = d.get("rope_scaling") or {}
        rp = d.get("rope_parameters") or {}
        if "compress" in rp:  # per attention kind: {"main": plain RoPE, "compress": YaRN}
            for part in ("main", "compress"):
                if not isinstance(rp.get(part, {}), dict):
                    raise ConfigError(f"config field 'rope_parameters.{part}': must be an object (got {rp[part]!r})")
            rope = rp["compress"]
            if "rope_theta" in rope:
                kw["compress_rope_theta"] = rope["rope_theta"]
            if "rope_theta" in rp.get("main", {}):
                kw["rope_theta"] = rp["main"]["rope_theta"]
        elif rp and not rope:
            rope = rp
        _apply_rope_scaling(kw, rope)
        eos = kw.get("eos_token_id")
        if isinstance(eos, list):  # transformers allows several end tokens; generation stops on the first
            if not eos:
                raise ConfigError("config field 'eos_token_id': must be a token id or a non-empty list of them "
                                  "(got [])")
            kw["eos_token_id"] = eos[0]
        if kw.get("bos_token_id") is None:
            kw.pop("bos_token_id", None)
        return cls(**kw)

    @classmethod
    def _from_official(cls, d: dict) -> "Config":
        m = {"vocab_size": "vocab_size", "dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size",
             "n_layers": "num_hidden_layers", "n_hash_layers": "num_hash_layers",
             "n_mtp_layers": "num_nextn_predict_layers", "n_heads": "num_attention_heads",
             "head_dim": "head_dim", "rope_head_dim": "qk_rope_head_dim", "q_lora_rank": "q_lora_rank",
             "o_groups": "o_groups", "o_lora_rank": "o_lora_rank", "window_size": "sliding_window",
             "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim", "index_topk": "index_topk",
             "n_routed_experts": "n_routed_experts", "n_activated_experts": "num_experts_per_tok",
             "n_shared_experts": "n_shared_experts", "score_func": "scoring_func", "route_scale": "routed_scaling_factor",
             "swiglu_limit": "swiglu_limit", "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters",
             "hc_eps": "hc_eps", "rope_theta": "rope_theta", "compress_rope_theta": "compress_rope_theta",
             "rope_factor": "rope_factor", "original_seq_len": "original_max_position_embeddings",
             "beta_fast": "beta_fast", "beta_slow": "beta_slow", "max_seq_len": "max_position_embeddings",
             "norm_eps": "rms_norm_eps"}
        kw = {dst: d[src] for src, dst in m.items() if src in d}
        if d.get("compress_ratios") is not None:
            kw.update(_types_from_ratios(d["compress_ratios"], _layer_count(kw), 4))
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """transformers-compatible config.json (DeepseekV4Config reads it unchanged)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("csa_compress_ratio", "hca_compress_ratio", "rope_factor", "original_max_position_embeddings",
                  "beta_fast", "beta_slow", "quant_simulation", "num_hash_layers", "qk_rope_head_dim"):
            d.pop(k)
        d["compress_rates"] = {CSA: self.csa_compress_ratio, HCA: self.hca_compress_ratio}
        d["mlp_layer_types"] = ["hash_moe" if self.is_hash_layer(i) else "moe" for i in range(self.num_hidden_layers)]
        prf = _rotary_factor(self.qk_rope_head_dim, self.head_dim)
        d["partial_rotary_factor"] = prf
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta, "partial_rotary_factor": prf}
        if self.rope_factor != 1.0:
            compress.update(rope_type="yarn", factor=self.rope_factor, attention_factor=1.0,
                            original_max_position_embeddings=self.original_max_position_embeddings,
                            beta_fast=self.beta_fast, beta_slow=self.beta_slow)
        d["rope_parameters"] = {
            "main": {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": prf},
            "compress": compress,
        }
        d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], num_key_value_heads=1,
                 hidden_act="silu")
        return d


def _rotary_factor(rope_dim: int, head_dim: int) -> float:
    """rope_dim / head_dim, nudged up to the nearest float from which transformers' int(head_dim * factor)
    gives rope_dim back (e.g. 30 / 44 * 44 is 29.999..., which it truncates to 29). Rounding reads it back too."""
    f = rope_dim / head_dim
    while int(head_dim * f) < rope_dim:
        f = math.nextafter(f, math.inf)
    return f


def _layer_count(kw: dict) -> int:
    """num_hidden_layers, checked here because the attention schedule is cut to it before validate runs."""
    n = kw.get("num_hidden_layers", Config.num_hidden_layers)
    if not is_int(n, 1):
        raise ConfigError(f"config field 'num_hidden_layers': must be a positive integer (got {n!r})")
    return n


def _types_from_ratios(ratios, n: int, csa_ratio: int) -> dict:
    if not isinstance(ratios, (list, tuple)) or len(ratios) < n:
        raise ConfigError(f"config field 'compress_ratios': needs at least num_hidden_layers={n} entries "
                          f"(got {ratios!r})")
    types, hca = [], set()
    for r in ratios[:n]:
        if not is_int(r, 0):
            raise ConfigError(f"config field 'compress_ratios': entries must be non-negative integers (got {r!r})")
        if r == 0:
            types.append(SLIDING)
        elif r == csa_ratio:
            types.append(CSA)
        else:
            types.append(HCA)
            hca.add(r)
    if len(hca) > 1:
        raise ConfigError(f"config field 'compress_ratios': at most one HCA ratio is supported (got {sorted(hca)})")
    out = {"layer_types": types}
    if hca:
        out["hca_compress_ratio"] = hca.pop()
    return out


def _hash_layers_from_types(types) -> int:
    n = 0
    while n < len(types) and types[n] == "hash_moe":
        n += 1
    if any(t == "hash_moe" for t in types[n:]):
        raise ConfigError("config field 'mlp_layer_types': hash_moe layers must come first")
    return n


def _apply_rope_scaling(kw: dict, rope: dict) -> None:
    if not rope:
        return
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        kw["rope_factor"] = rope.get("factor", 16.0)  # validate names a bad one (as rope_factor)
        for src, dst in (("original_max_position_embeddings", "original_max_position_embeddings"),
                         ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if src in rope:
                kw[dst] = rope[src]
        af = rope.get("attention_factor", 1.0)
        if af not in (None, 1.0):
            raise ConfigError(f"config field 'rope_scaling.attention_factor': V4 uses 1.0 (got {af!r})")
    elif kind == "default":
        kw["rope_factor"] = 1.0
    else:
        raise ConfigError(f"config field 'rope_scaling': type must be 'yarn' or 'default' (got {kind!r})")
