"""`dsv4 convert` streams (checkpoint.convert_checkpoint): it writes exactly what the in-memory writers write for
the loaded model, refuses what load_model refuses without leaving a destination, and holds far less memory."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv4
import dsv4.checkpoint as ck
from dsv4.checkpoint import convert_checkpoint
from dsv4.cli import BUNDLED, main
from dsv4.config import CSA, HCA, SLIDING
from dsv4.quant import quant_fp4_weight
from helpers import random_model, tid2eid_with

CFG = dsv4.Config.tiny()
SHARD = 150_000  # several shards for the tiny models, in the sources and the outputs
E, D, INTER = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size


def tensors(path):
    """Every tensor of a checkpoint directory by name, and its shards' names."""
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            assert k not in out, k
            out[k] = v
    return out, [f.name for f in files]


def bits(t):  # exact comparison for every dtype, float8 included (NaN-safe too)
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_same_checkpoint(got, want):
    """Same tensors (names, dtypes, values), same config.json, a consistent index."""
    a, shards = tensors(got)
    b, _ = tensors(want)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k
    assert json.loads((got / "config.json").read_text()) == json.loads((want / "config.json").read_text())
    if len(shards) > 1:
        index = json.loads((got / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(a) and sorted(set(index["weight_map"].values())) == shards
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in a.values())
    else:
        assert shards == ["model.safetensors"] and not (got / "model.safetensors.index.json").exists()


def in_memory(src, dst, to, dtype, fp8=True, fp4_experts=True):
    """The oracle: the whole model loaded, then written by save_model / save_official."""
    model = dsv4.load_model(src, dtype=dtype)
    if to == "hf":
        dsv4.save_model(model, dst, max_shard_bytes=SHARD)
    else:
        dsv4.save_official(model, dst, max_shard_bytes=SHARD, fp8=fp8, fp4_experts=fp4_experts)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Checkpoints of both layouts, sharded: HF, official FP8/FP4, official BF16 (experts per expert, unquantised),
    HF with tied embeddings, and HF without its mtp.* weights (as transformers saves it)."""
    root = tmp_path_factory.mktemp("sources")
    model = random_model(CFG, seed=1)
    tied = random_model(dsv4.Config.tiny(tie_word_embeddings=True), seed=2)
    dsv4.save_model(model, root / "hf", max_shard_bytes=SHARD)
    dsv4.save_official(model, root / "official", max_shard_bytes=SHARD)
    dsv4.save_official(model, root / "official-bf16", max_shard_bytes=SHARD, fp8=False, fp4_experts=False)
    dsv4.save_model(tied, root / "hf-tied", max_shard_bytes=SHARD)
    shutil.copytree(root / "hf", root / "hf-no-mtp")
    index = json.loads((root / "hf-no-mtp" / "model.safetensors.index.json").read_text())
    for f in (root / "hf-no-mtp").glob("*.safetensors"):
        save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith("mtp.")}, str(f))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    (root / "hf-no-mtp" / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


TARGETS = [("hf", {}), ("official", {}), ("official", {"fp8": False}), ("official", {"fp4_experts": False}),
           ("official", {"fp8": False, "fp4_experts": False})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("to,flags", TARGETS, ids=["hf", "official", "no-fp8", "no-fp4", "bf16"])
@pytest.mark.parametrize("source", ["hf", "official", "official-bf16", "hf-tied"])
def test_streamed_conversion_writes_what_the_in_memory_writers_write(sources, tmp_path, source, to, flags, dtype):
    """Every layout to every layout, both dtypes, FP8/FP4 on and off, tied embeddings, MTP and hash layers."""
    convert_checkpoint(sources / source, tmp_path / "streamed", to, dtype, max_shard_bytes=SHARD, **flags)
    in_memory(sources / source, tmp_path / "in-memory", to, dtype, **flags)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "in-memory")


@pytest.mark.parametrize("to", ["hf", "official"])
def test_a_checkpoint_without_mtp_weights_converts_without_the_mtp_module(sources, tmp_path, to):
    with pytest.warns(UserWarning, match="no mtp"):
        convert_checkpoint(sources / "hf-no-mtp", tmp_path / "streamed", to, torch.float32, max_shard_bytes=SHARD)
    with pytest.warns(UserWarning, match="no mtp"):
        in_memory(sources / "hf-no-mtp", tmp_path / "in-memory", to, torch.float32)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "in-memory")
    assert not any(k.startswith("mtp.") for k in tensors(tmp_path / "streamed")[0])


def test_shards_are_written_as_they_fill_within_the_limit(sources, tmp_path):
    """Each output shard holds at most the limit (or one larger tensor), and is saved before the source's later
    tensors are read."""
    events = []
    read, save = ck._Source.read, ck._save_shard
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck._Source, "read", lambda self, *a: events.append("read") or read(self, *a))
        mp.setattr(ck, "_save_shard", lambda f, t: events.append("save") or save(f, t))
        convert_checkpoint(sources / "official", tmp_path / "out", "hf", torch.float32, max_shard_bytes=SHARD)
    assert events.count("save") > 3 and events[-1] == "save"
    assert "read" in events[events.index("save"):]  # the first shard was written before reading was done
    for f in (tmp_path / "out").glob("*.safetensors"):
        sizes = [v.numel() * v.element_size() for v in load_file(str(f)).values()]
        assert sum(sizes) <= SHARD or len(sizes) == 1, f.name


# ---- bad input: refused as load_model refuses it, and no destination is left ----

def copy_of(path, tmp_path):
    out = tmp_path / "src"
    shutil.copytree(path, out)
    return out


def shard_holding(path, key):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def rewrite(f, change):
    """Rewrite shard f's tensors with change(dict) applied."""
    with safe_open(str(f), "pt") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
    change(t)
    save_file(t, str(f))


def assert_refused_alike(src, tmp_path, to="official", same_message=True):
    """convert raises what load_model raises for `src` (the same type, and the same message where `src` has one
    fault) and leaves no destination, nor a temporary directory beside it; returns the error."""
    with pytest.raises((dsv4.CheckpointError, dsv4.ConfigError)) as want:
        dsv4.load_model(src, dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir(parents=True)
    with pytest.raises(type(want.value)) as got:
        convert_checkpoint(src, out / "dst", to, torch.float32, max_shard_bytes=SHARD)
    assert str(got.value) == str(want.value) or not same_message
    assert list(out.iterdir()) == []
    return got.value


def nan_at(t, *index):
    t[index] = float("nan")
    return t


def drop(*keys):
    return lambda t: [t.pop(k) for k in keys]


def test_refuses_a_truncated_shard(sources, tmp_path):
    src = copy_of(sources / "official", tmp_path)
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-1000])
    assert victim.name in str(assert_refused_alike(src, tmp_path))


def test_refuses_a_tensor_of_another_shape(sources, tmp_path):
    src = copy_of(sources / "hf", tmp_path)

    def shrink(t):
        t["model.layers.2.self_attn.sinks"] = torch.zeros(3)
    rewrite(shard_holding(src, "model.layers.2.self_attn.sinks"), shrink)
    assert "attn_sink' has shape (3,)" in str(assert_refused_alike(src, tmp_path))


def test_refuses_a_config_whose_shapes_the_checkpoint_does_not_have(sources, tmp_path):
    """Many tensors are wrong: streamed in model order, convert may name another of them than load_model."""
    src = copy_of(sources / "hf", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["q_lora_rank"] = 24
    (src / "config.json").write_text(json.dumps(cfg))
    assert "the config expects (24" in str(assert_refused_alike(src, tmp_path, same_message=False))


@pytest.mark.parametrize("source,keys,named", [
    ("hf", ["model.layers.2.self_attn.sinks"], "layers.2.attn.attn_sink"),
    ("official", ["layers.1.attn.wq_b.scale"], "without their scale"),
    ("official", ["layers.3.ffn.experts.5.w2.weight", "layers.3.ffn.experts.5.w2.scale"], "layers.3.ffn.experts.w2"),
    ("official-bf16", ["mtp.0.ffn.experts.7.w3.weight"], "mtp.0.ffn.experts.w3"),
    ("official", ["layers.1.attn.wq_b.weight"], "scales without their weight): ['layers.1.attn.wq_b']"),
    ("official", [f"layers.1.ffn.experts.3.{w}.{p}" for w in ("w1", "w2", "w3") for p in ("weight", "scale")],
     "'layers.1.ffn.experts.w1', 'layers.1.ffn.experts.w2', 'layers.1.ffn.experts.w3'"),
])
def test_refuses_a_checkpoint_that_lacks_a_tensor(sources, tmp_path, source, keys, named):
    src = copy_of(sources / source, tmp_path)
    rewrite(shard_holding(src, keys[0]), drop(*keys))
    assert named in str(assert_refused_alike(src, tmp_path))


@pytest.mark.parametrize("source,extra,named", [
    ("hf", {"model.layers.9.mlp.experts.down_proj": torch.zeros(E, D, INTER)}, "has no place"),
    ("hf", {"model.layers.1.mlp.experts.gate_up_proj": torch.zeros(5)}, "has shape (5,)"),
    ("official", {"layers.9.ffn.experts.0.w1.weight": torch.zeros(INTER, D)}, "has no place"),
    ("official", dict(zip(("layers.9.ffn.experts.0.w1.weight", "layers.9.ffn.experts.0.w1.scale"),
                          quant_fp4_weight(torch.randn(INTER, D)))), "has no place"),
    ("official", {"layers.1.ffn.experts.8.w1.weight": torch.zeros(INTER, D)}, "out of range"),
    ("official", {"unknown.weight": torch.zeros(3)}, "has no place"),
    ("official", {"head.scale": torch.ones(1, 1)}, "scales without their weight): ['head']"),
    ("official", tid2eid_with(99), "expert ids outside"),
    ("official", tid2eid_with(-1), "expert ids outside"),
    ("official", tid2eid_with(1.5, torch.float32), "integer expert ids"),
    ("official", {"layers.1.attn.wq_a.weight": torch.zeros(64, dtype=torch.float8_e4m3fn),
                  "layers.1.attn.wq_a.scale": torch.ones(1, 1)}, "expected a matrix"),
    # routed experts, read one at a time from transformers' stacks
    ("hf", {"model.layers.1.mlp.experts.gate_up_proj": torch.zeros(E + 1, 2 * INTER, D)}, "out of range"),
    ("hf", {"model.layers.1.mlp.experts.gate_up_proj": torch.zeros(E, 2 * INTER + 1, D)}, "expert 0 has shape"),
    ("hf", {"model.layers.2.mlp.experts.gate_up_proj": nan_at(torch.zeros(E, 2 * INTER, D), 5, INTER + 2, 0)},
     "w3[5]' contains NaN"),
    ("hf", {"model.layers.3.mlp.experts.down_proj": torch.zeros(E - 1, D, INTER)}, "layers.3.ffn.experts.w2"),
    ("hf", {"layers.1.ffn.experts.w1": torch.zeros(E, INTER, D + 1)}, "the config expects"),
])
def test_refuses_a_bad_tensor_by_name(sources, tmp_path, source, extra, named):
    """The bad tensor sits in an extra shard, which the index names for it."""
    src = copy_of(sources / source, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "extra.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(extra, str(src / "extra.safetensors"))
    assert named in str(assert_refused_alike(src, tmp_path))


@pytest.mark.parametrize("to", ["hf", "official"])
def test_routed_experts_are_taken_as_load_model_takes_them(sources, tmp_path, to):
    """Routed experts stacked under the model's own names (layer 1), and a layer's expert given twice, stacked and
    alone in a later shard (layer 2, expert 3's w1: the later one counts), convert as load_model loads them."""
    src = copy_of(sources / "hf", tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    prefix = "model.layers.1.mlp.experts."
    with safe_open(str(shard_holding(src, prefix + "gate_up_proj")), "pt") as h:
        gate_up = h.get_tensor(prefix + "gate_up_proj")
    with safe_open(str(shard_holding(src, prefix + "down_proj")), "pt") as h:
        down = h.get_tensor(prefix + "down_proj")
    extra = {"layers.1.ffn.experts.w1": gate_up[:, :INTER], "layers.1.ffn.experts.w3": gate_up[:, INTER:],
             "layers.1.ffn.experts.w2": down, "layers.2.ffn.experts.3.w1.weight": torch.randn(INTER, D)}
    for key in (prefix + "gate_up_proj", prefix + "down_proj"):
        rewrite(shard_holding(src, key), drop(key))
        del index["weight_map"][key]
    index["weight_map"].update(dict.fromkeys(extra, "zzz.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: v.contiguous() for k, v in extra.items()}, str(src / "zzz.safetensors"))
    convert_checkpoint(src, tmp_path / "streamed", to, torch.float32, max_shard_bytes=SHARD)
    in_memory(src, tmp_path / "in-memory", to, torch.float32)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "in-memory")
    if to == "hf":
        assert torch.equal(tensors(tmp_path / "streamed")[0]["model.layers.2.mlp.experts.gate_up_proj"][3, :INTER],
                           extra["layers.2.ffn.experts.3.w1.weight"])


def test_a_bad_value_read_late_leaves_no_destination_after_shards_were_written(sources, tmp_path):
    """A NaN in the source's last shard is found after output shards were saved: they go with the temporary
    directory."""
    src = copy_of(sources / "hf", tmp_path)
    last = sorted(src.glob("*.safetensors"))[-1]
    with safe_open(str(last), "pt") as h:
        key = [k for k in h.keys() if h.get_slice(k).get_dtype() == "F32"][-1]

    def nan(t):
        t[key].view(-1)[0] = float("nan")
    rewrite(last, nan)
    saved = []
    with pytest.MonkeyPatch.context() as mp:
        save = ck._save_shard
        mp.setattr(ck, "_save_shard", lambda f, t: saved.append(f) or save(f, t))
        assert "contains NaN" in str(assert_refused_alike(src, tmp_path, to="hf"))
    assert len(saved) > 2


def test_refuses_nan_expert_scales_and_integer_scales(sources, tmp_path):
    key = "layers.1.ffn.experts.0.w1.scale"
    src = copy_of(sources / "official", tmp_path / "nan")

    def nan_scale(t):
        t[key] = t[key].view(torch.uint8).clone()
        t[key].view(-1)[0] = 0xFF  # UE8M0's NaN
    rewrite(shard_holding(src, key), nan_scale)
    assert "NaN" in str(assert_refused_alike(src, tmp_path / "nan"))
    src = copy_of(sources / "official", tmp_path / "int")

    def int_scale(t):
        t[key] = t[key].view(torch.uint8).int()
    rewrite(shard_holding(src, key), int_scale)
    assert "int32" in str(assert_refused_alike(src, tmp_path / "int"))


def test_refuses_tied_embeddings_that_differ(sources, tmp_path):
    src = copy_of(sources / "hf-tied", tmp_path)

    def untie(t):
        t["lm_head.weight"] = torch.zeros(CFG.vocab_size, D)
    rewrite(shard_holding(src, "model.embed_tokens.weight"), untie)
    assert "tie_word_embeddings" in str(assert_refused_alike(src, tmp_path))


def test_refuses_a_tensor_in_two_shards_without_an_index(sources, tmp_path):
    src = copy_of(sources / "official", tmp_path)
    save_file({"head.weight": torch.zeros(CFG.vocab_size, D, dtype=torch.bfloat16)}, str(src / "aaa.safetensors"))
    (src / "model.safetensors.index.json").unlink()
    assert "in two shards" in str(assert_refused_alike(src, tmp_path))


def test_refuses_an_index_naming_a_missing_shard(sources, tmp_path):
    src = copy_of(sources / "official", tmp_path)
    gone = shard_holding(src, "layers.1.attn.wq_a.weight")
    gone.unlink()
    assert f"names shard files that are missing: ['{gone.name}']" in str(assert_refused_alike(src, tmp_path))


@pytest.mark.parametrize("weight_map", [[1, 2], {"embed.weight": "../model.safetensors"}])
def test_refuses_a_malformed_index(sources, tmp_path, weight_map):
    src = copy_of(sources / "official", tmp_path)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert "'weight_map'" in str(assert_refused_alike(src, tmp_path))


def test_refuses_pickles_and_invalid_configs(tmp_path):
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle" / "pytorch_model.bin")
    assert "pickle" in str(assert_refused_alike(tmp_path / "pickle", tmp_path / "p"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps({**CFG.to_hf_dict(), "o_groups": 3}))
    assert "o_groups" in str(assert_refused_alike(tmp_path / "config", tmp_path / "c"))


def test_refuses_what_the_official_config_cannot_say_before_reading(tmp_path):
    """As save_official refuses it, before any tensor is read."""
    src = tmp_path / "src"
    model = random_model(dsv4.Config.tiny(norm_topk_prob=False))
    dsv4.save_model(model, src)
    with pytest.raises(dsv4.ConfigError) as want:
        dsv4.save_official(dsv4.load_model(src), tmp_path / "x")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck._Source, "read", lambda *a: pytest.fail("read a tensor"))
        with pytest.raises(dsv4.ConfigError) as got:
            convert_checkpoint(src, tmp_path / "dst", "official")
    assert str(got.value) == str(want.value) and not (tmp_path / "dst").exists()


# ---- the command line ----

def logits(path, ids):
    with torch.no_grad():
        return dsv4.load_model(path, dtype=torch.float32)(ids)


def test_convert_command_equals_the_writers_and_keeps_the_tokenizer(tmp_path, capsys):
    """dsv4 convert writes what the in-memory writers write for its options; official -> HF gives the same
    logits as the official checkpoint itself, HF -> HF those of the source; the tokenizer comes along;
    nothing is overwritten, and a refused source leaves no destination."""
    ids = torch.tensor([[0, 5, 17, 99, 3, 250]])
    official, back, same = tmp_path / "official", tmp_path / "back", tmp_path / "same"
    assert main(["convert", str(BUNDLED), str(official), "--to", "official"]) == 0
    in_memory(BUNDLED, tmp_path / "direct", "official", torch.bfloat16)
    assert_same_checkpoint(official, tmp_path / "direct")
    config = json.loads((official / "config.json").read_text())
    assert config["dtype"] == "fp8" and config["expert_dtype"] == "fp4"
    assert main(["convert", str(BUNDLED), str(tmp_path / "plain"), "--to", "official", "--no-fp8", "--no-fp4",
                 "--dtype", "float32"]) == 0
    in_memory(BUNDLED, tmp_path / "plain-direct", "official", torch.float32, fp8=False, fp4_experts=False)
    assert_same_checkpoint(tmp_path / "plain", tmp_path / "plain-direct")
    assert main(["convert", str(official), str(back), "--to", "hf", "--dtype", "float32"]) == 0
    assert torch.equal(logits(back, ids), logits(official, ids))
    for out in (official, back):
        assert (out / "tokenizer.json").read_bytes() == (BUNDLED / "tokenizer.json").read_bytes()
    assert main(["convert", str(BUNDLED), str(same), "--to", "hf", "--dtype", "float32"]) == 0
    assert torch.equal(logits(same, ids), logits(BUNDLED, ids))
    capsys.readouterr()
    bad = tmp_path / "bad"
    shutil.copytree(official, bad)
    (bad / "config.json").write_text(json.dumps({**json.loads((bad / "config.json").read_text()), "dim": 96}))
    for args, named in (([str(BUNDLED), str(back)], "not empty"), ([str(BUNDLED), str(BUNDLED)], "is the source"),
                        ([str(tmp_path / "none"), str(tmp_path / "x")], "not a checkpoint directory"),
                        ([str(bad), str(tmp_path / "y")], "has shape")):
        assert main(["convert", *args, "--to", "hf"]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err
    assert (back / "config.json").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- memory ----

PEAK_SCRIPT = r"""
import sys, torch, dsv4
from dsv4.checkpoint import convert_checkpoint


def hwm():  # peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


src, dst, how, shard_mib = sys.argv[1:]
base = hwm()
if how == "in-memory":  # load_model, then save_model
    dsv4.save_model(dsv4.load_model(src, dtype=torch.float32), dst, max_shard_bytes=int(shard_mib) << 20)
else:  # streamed, to layout `how`
    convert_checkpoint(src, dst, how, torch.float32, max_shard_bytes=int(shard_mib) << 20)
print(hwm() - base)
"""


def peak_growth(src, dst, how, shard_mib):
    """How much more memory a fresh process converting `src` to `dst` (PEAK_SCRIPT) held at its peak than at its
    start, in bytes."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(dst), how, str(shard_mib)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def test_streamed_conversion_peak_memory_is_a_fraction_of_the_in_memory_path(tmp_path):
    """A 24-layer model of ~340 MB (fp32) in 16 MB shards: the in-memory path holds the model (at least its size
    more than it started with); streaming holds a shard and a few experts, well under half of that."""
    cfg = dsv4.Config.tiny(hidden_size=256, moe_intermediate_size=256, n_routed_experts=16, vocab_size=4096,
                           num_hidden_layers=24, layer_types=[[SLIDING, CSA, HCA, CSA][i % 4] for i in range(24)])
    model = random_model(cfg)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dsv4.save_model(model, tmp_path / "src", max_shard_bytes=16 << 20)
    del model

    streamed = peak_growth(tmp_path / "src", tmp_path / "streamed", "hf", 16)
    whole = peak_growth(tmp_path / "src", tmp_path / "in-memory", "in-memory", 16)
    print(f"\nmodel {model_bytes / 2**20:.0f} MiB: peak growth streamed {streamed / 2**20:.0f} MiB, "
          f"in memory {whole / 2**20:.0f} MiB")
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "in-memory")
    assert streamed < model_bytes / 2 and 2 * streamed < whole


def test_streamed_conversion_holds_a_few_routed_experts_not_a_blocks(tmp_path):
    """One block of 512 experts, 384 MB stacked (fp32), in 8 MB shards: HF -> official (FP4) and back each hold a
    shard and a few experts, 25-130 MB with what glibc's heap keeps of FP4 quantisation's temporaries, under half
    the block's experts; converting a block's experts together held them all stacked (340-370 MB)."""
    cfg = dsv4.Config.tiny(hidden_size=512, moe_intermediate_size=128, n_routed_experts=512, vocab_size=1024,
                           num_hidden_layers=1, layer_types=[SLIDING], num_nextn_predict_layers=0)
    block = 3 * cfg.n_routed_experts * cfg.moe_intermediate_size * cfg.hidden_size * 4
    dsv4.save_model(random_model(cfg), tmp_path / "hf", max_shard_bytes=8 << 20)
    to_official = peak_growth(tmp_path / "hf", tmp_path / "official", "official", 8)
    to_hf = peak_growth(tmp_path / "official", tmp_path / "back", "hf", 8)
    print(f"\nrouted experts {block / 2**20:.0f} MiB a block: peak growth HF -> official {to_official / 2**20:.0f} "
          f"MiB, official -> HF {to_hf / 2**20:.0f} MiB")
    assert max(to_official, to_hf) < block / 2
    key = "model.layers.0.mlp.experts.gate_up_proj"
    with safe_open(str(shard_holding(tmp_path / "back", key)), "pt") as h:
        assert h.get_slice(key).get_shape() == [512, 256, 512]
