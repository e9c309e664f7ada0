"""Official-layout and HF-format checkpoints: equal logits, packed FP4, streaming memory, clear errors."""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv4
from dsv4.quant import dequant_fp4_weight, dequant_fp8_weight, quant_fp4_weight, quant_fp8_weight
from helpers import random_model, tid2eid_with

CFG = dsv4.Config.tiny()
# architecture.md section 10 dtype table, restated independently of dsv4.checkpoint
FP8 = re.compile(r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|indexer\.wq_b\.weight$|shared_experts\.w[123]\.weight$"
                 r"|[eh]_proj\.weight$")
F32 = re.compile(r"hc_\w+_(fn|base|scale)$|attn_sink$|\.ape$")


def quantised_equivalent(model):
    """The dequantised model the official layout encodes: FP8/FP4 round trips, BF16 elsewhere."""
    sd = {}
    for k, v in model.state_dict().items():
        if v.dtype == torch.long or k.endswith("gate.bias") or F32.search(k):
            sd[k] = v.clone()
        elif re.search(r"ffn\.experts\.w[123]$", k):
            sd[k] = torch.stack([dequant_fp4_weight(*quant_fp4_weight(w)) for w in v])
        elif FP8.search(k):
            sd[k] = dequant_fp8_weight(*quant_fp8_weight(v))
        else:
            sd[k] = v.to(torch.bfloat16).float()
    out = random_model(model.config)
    out.load_state_dict(sd)
    return out


def copy_files(src, dst):
    """The checkpoint's files, copied into dst (tests then damage the copy)."""
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    model = random_model(CFG, seed=4)
    path = tmp_path_factory.mktemp("official")
    dsv4.save_official(model, path, max_shard_bytes=150_000)
    return model, path


def test_official_layout_on_disk(official):
    _, path = official
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["dim"] == CFG.hidden_size and cfg["compress_ratios"] == [0, 4, 16, 4, 0]
    f = path / index["weight_map"]["layers.1.attn.wq_a.weight"]
    with safe_open(str(f), "pt") as h:
        assert h.get_tensor("layers.1.attn.wq_a.weight").dtype == torch.float8_e4m3fn
    f = path / index["weight_map"]["layers.1.ffn.experts.3.w1.weight"]
    with safe_open(str(f), "pt") as h:
        w = h.get_tensor("layers.1.ffn.experts.3.w1.weight")
        assert w.dtype == torch.int8 and w.shape == (CFG.moe_intermediate_size, CFG.hidden_size // 2)
    assert "mtp.0.e_proj.weight" in index["weight_map"] and "layers.0.ffn.gate.tid2eid" in index["weight_map"]


def test_official_checkpoint_equals_dequantised_hf_checkpoint(official, tmp_path):
    model, path = official
    dsv4.save_model(quantised_equivalent(model), tmp_path)
    a = dsv4.load_model(path, dtype=torch.float32)
    b = dsv4.load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, CFG.vocab_size, (2, 48))
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max().item() <= 1e-5
        X = a.streams(ids)
        assert (a.mtp_logits(X, ids) - b.mtp_logits(X, ids)).abs().max().item() <= 1e-5


def test_packed_fp4_experts_give_the_same_logits(official):
    _, path = official
    dense = dsv4.load_model(path, dtype=torch.float32)
    packed = dsv4.load_model(path, dtype=torch.float32, fp4_experts=True)
    assert packed.layers[1].ffn.experts.w1_packed.dtype == torch.int8
    assert not any("experts.w1" == n.split("ffn.")[-1] for n, _ in packed.named_parameters())
    ids = torch.randint(0, CFG.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.allclose(dense(ids), packed(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("save", ["save_model", "save_official"])
def test_a_model_with_packed_experts_saves_as_its_dense_twin(official, tmp_path, save):
    """save_model / save_official of a model loaded with fp4_experts=True (experts dequantised one at a time as
    they are written) give the files the same checkpoint loaded dense gives, tensor for tensor."""
    _, path = official
    getattr(dsv4, save)(dsv4.load_model(path, dtype=torch.float32, fp4_experts=True), tmp_path / "packed")
    getattr(dsv4, save)(dsv4.load_model(path, dtype=torch.float32), tmp_path / "dense")
    a, b = ({k: v for f in sorted((tmp_path / d).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
            for d in ("packed", "dense"))
    assert a.keys() == b.keys() and any("experts" in k for k in a)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_scales_stored_as_bytes_or_floats_load_alike(official, tmp_path):
    """UE8M0 scales saved as raw uint8 bytes or as float32 (converters without an e8m0 dtype) give the
    same weights on both expert paths; uint8 read as numbers was silently wrong (errors up to 730)."""
    import shutil

    _, path = official
    ref = dsv4.load_model(path, dtype=torch.float32).state_dict()
    for name, conv in (("bytes", lambda t: t.view(torch.uint8)), ("float", lambda t: t.float()),
                       ("int32", lambda t: t.view(torch.uint8).int()), ("inexact", lambda t: t.float() * 1.5)):
        out = tmp_path / name
        shutil.copytree(path, out)
        for f in out.glob("*.safetensors"):
            save_file({k: conv(v) if k.endswith(".scale") else v for k, v in load_file(str(f)).items()}, str(f))
        if name == "int32":
            with pytest.raises(dsv4.CheckpointError, match="int32"):
                dsv4.load_model(out, dtype=torch.float32)
            continue
        if name == "inexact":  # float scales that are no powers of two: fine dequantised, not as UE8M0
            with pytest.raises(dsv4.CheckpointError, match="powers of two"):
                dsv4.load_model(out, dtype=torch.float32, fp4_experts=True)
            continue
        got = dsv4.load_model(out, dtype=torch.float32).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
        packed = dsv4.load_model(out, dtype=torch.float32, fp4_experts=True).layers[1].ffn.experts
        assert torch.equal(packed.weights(0, torch.float32)[0], ref["layers.1.ffn.experts.w1"][0]), name


def test_bf16_load_runs(official):
    _, path = official
    m = dsv4.load_model(path)  # default bf16
    assert m.layers[1].attn.wq_a.weight.dtype == torch.bfloat16
    assert dsv4.load_model(path, dtype="float16").layers[1].attn.wq_a.weight.dtype == torch.float16
    with pytest.raises(dsv4.ConfigError, match="float32, bfloat16, float16, float64"):
        dsv4.load_model(path, dtype=torch.int8)
    assert m.layers[1].hc_attn_fn.dtype == torch.float32 and m.layers[1].attn.attn_sink.dtype == torch.float32
    out = m(torch.randint(0, CFG.vocab_size, (1, 20)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- bad input ----

def test_truncated_shard_names_the_file(official, tmp_path):
    _, path = official
    copy_files(path, tmp_path)
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(dsv4.CheckpointError, match=victim.name):
        dsv4.load_model(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = random_model(CFG)
    dsv4.save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["q_lora_rank"] = 24
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dsv4.CheckpointError, match="has shape"):
        dsv4.load_model(tmp_path)


def test_missing_tensor_is_reported(tmp_path):
    model = random_model(CFG)
    dsv4.save_model(model, tmp_path)
    f = tmp_path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if "layers.2.self_attn.sinks" not in k}
    save_file(tensors, str(f))
    with pytest.raises(dsv4.CheckpointError, match="layers.2.attn.attn_sink"):
        dsv4.load_model(tmp_path)


@pytest.mark.parametrize("key,match", [
    ("layers.1.attn.wq_b.scale", "layers.1.attn.wq_b"),
    ("layers.1.attn.wq_b.weight", r"scales without their weight\): \['layers.1.attn.wq_b'\]"),
], ids=["scale", "weight"])
def test_a_quantised_weight_or_scale_without_its_partner_is_reported(official, tmp_path, key, match):
    _, path = official
    copy_files(path, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    f = tmp_path / index["weight_map"][key]
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k != key}
    save_file(tensors, str(f))
    with pytest.raises(dsv4.CheckpointError, match=match):
        dsv4.load_model(tmp_path)


def test_an_index_naming_a_missing_shard_names_the_file(official, tmp_path):
    """Reported for the index (which lists the files it lacks), before any shard is read."""
    _, path = official
    copy_files(path, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = index["weight_map"]["layers.1.attn.wq_a.weight"]
    (tmp_path / gone).unlink()
    with pytest.raises(dsv4.CheckpointError, match=rf"index.json: names shard files that are missing: \['{gone}'\]"):
        dsv4.load_model(tmp_path)


@pytest.mark.parametrize("fp4_experts", [False, True], ids=["dense", "packed"])
def test_a_routed_expert_missing_from_an_official_checkpoint_is_reported(official, tmp_path, fp4_experts):
    """Expert 3 of layer 1 dropped (all its weights and scales): the other experts do not fill its place."""
    _, path = official
    copy_files(path, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = [k for k in index["weight_map"] if k.startswith("layers.1.ffn.experts.3.")]
    assert len(gone) == 6
    for f in {tmp_path / index["weight_map"][k] for k in gone}:
        save_file({k: v for k, v in load_file(str(f)).items() if k not in gone}, str(f))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in gone}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(dsv4.CheckpointError, match=r"lacks tensors .*'layers.1.ffn.experts.w1', "
                                                     r"'layers.1.ffn.experts.w2', 'layers.1.ffn.experts.w3'"):
        dsv4.load_model(tmp_path, fp4_experts=fp4_experts)


def test_a_stack_of_too_few_routed_experts_is_reported(tmp_path):
    """transformers' down_proj with E - 1 experts: the last expert's w2 is missing."""
    dsv4.save_model(random_model(CFG), tmp_path)
    f = tmp_path / "model.safetensors"
    key = "model.layers.1.mlp.experts.down_proj"
    tensors = load_file(str(f))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(dsv4.CheckpointError, match=r"lacks tensors .*\['layers.1.ffn.experts.w2'\]"):
        dsv4.load_model(tmp_path)


def test_tied_embeddings_that_differ_are_refused(tmp_path):
    """tie_word_embeddings true but a head.weight that is not embed.weight: loading either would give a model
    other than the checkpoint's."""
    dsv4.save_model(random_model(dsv4.Config.tiny(tie_word_embeddings=True)), tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    assert "lm_head.weight" not in tensors  # written once, as embed_tokens
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(f))
    with pytest.raises(dsv4.CheckpointError, match="tie_word_embeddings is true but the checkpoint's head.weight"):
        dsv4.load_model(tmp_path, dtype=torch.float32)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # equal copies load
    save_file(tensors, str(f))
    m = dsv4.load_model(tmp_path, dtype=torch.float32)
    assert m.head.weight is m.embed.weight


E, D, INTER = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size


@pytest.mark.parametrize("layout,tensors,match", [
    ("hf", {"model.layers.9.mlp.experts.down_proj": torch.zeros(E, D, INTER)}, "layers.9.ffn.experts.w2' has no place"),
    ("hf", {"model.layers.1.mlp.experts.gate_up_proj": torch.zeros(5)}, r"gate_up' has shape \(5,\)"),
    ("official", {"layers.9.ffn.experts.0.w1.weight": torch.zeros(INTER, D)}, "layers.9.ffn.experts.w1' has no place"),
    ("official", dict(zip(("layers.9.ffn.experts.0.w1.weight", "layers.9.ffn.experts.0.w1.scale"),
                          quant_fp4_weight(torch.randn(INTER, D)))), "layers.9.ffn.experts.0.w1.weight' has no place"),
    ("official", tid2eid_with(99), "tid2eid' holds expert ids outside"),
    ("official", tid2eid_with(-1), "tid2eid' holds expert ids outside"),
    ("official", tid2eid_with(1.5, torch.float32), "tid2eid' must hold integer expert ids"),
    ("official", {"layers.1.attn.wq_a.weight": torch.zeros(64, dtype=torch.float8_e4m3fn),
                  "layers.1.attn.wq_a.scale": torch.ones(1, 1)}, r"wq_a.weight' has shape \(64,\)"),
    # expert id E is one past the last expert: refused by name, not an IndexError from the stack
    ("official", {"layers.1.ffn.experts.8.w1.weight": torch.zeros(INTER, D)}, "expert index 8 out of range"),
    ("hf", {"model.layers.1.mlp.experts.gate_up_proj": torch.zeros(E + 1, 2 * INTER, D)},
     "expert index 8 out of range"),
    # a scale beside a weight that is not quantised: dropping it silently would hide a damaged checkpoint
    ("official", {"head.scale": torch.ones(1, 1)}, r"scales without their weight\): \['head'\]"),
])
def test_bad_tensors_are_reported_by_name(official, tmp_path, layout, tensors, match):
    """Each bad tensor sits in an extra shard that loads first (it sorts before model*.safetensors)."""
    if layout == "hf":
        dsv4.save_model(random_model(CFG), tmp_path)
    else:
        copy_files(official[1], tmp_path)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        index["weight_map"].update(dict.fromkeys(tensors, "extra.safetensors"))
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(dsv4.CheckpointError, match=match):
        dsv4.load_model(tmp_path)


def test_a_tensor_in_two_shards_loads_the_copy_the_index_names(official, tmp_path):
    """A stale copy in another shard the index lists (for another tensor) used to overwrite the indexed one;
    without an index a tensor in two shards is ambiguous, and refused."""
    model, path = official
    copy_files(path, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    with safe_open(str(tmp_path / index["weight_map"]["head.weight"]), "pt") as h:
        head = h.get_tensor("head.weight")
    save_file({"embed.weight": torch.zeros_like(head), "head.weight": head}, str(tmp_path / "zzz.safetensors"))
    index["weight_map"]["head.weight"] = "zzz.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = dsv4.load_model(tmp_path, dtype=torch.float32).embed.weight
    assert torch.equal(got, model.embed.weight.to(torch.bfloat16).float())
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(dsv4.CheckpointError, match="'(embed|head).weight' is in two shards"):
        dsv4.load_model(tmp_path)


def test_a_nan_expert_scale_is_refused_on_either_expert_path(official, tmp_path):
    """UE8M0 byte 0xFF is NaN: fp4_experts=True kept it packed and gave NaN logits."""
    _, path = official
    copy_files(path, tmp_path)
    key = "layers.1.ffn.experts.0.w1.scale"
    f = tmp_path / json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    tensors[key] = tensors[key].view(torch.uint8).clone()
    tensors[key].view(-1)[0] = 0xFF
    save_file(tensors, str(f))
    for packed in (False, True):
        with pytest.raises(dsv4.CheckpointError, match="layers.1.ffn.experts.w1.*NaN"):
            dsv4.load_model(tmp_path, fp4_experts=packed)


@pytest.mark.parametrize("weight_map", [[1, 2], {"embed.weight": None}, {"embed.weight": "../model.safetensors"}])
def test_malformed_index_is_reported(official, tmp_path, weight_map):
    copy_files(official[1], tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(dsv4.CheckpointError, match="index.json: 'weight_map'"):
        dsv4.load_model(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(dsv4.CheckpointError, match="pickle"):
        dsv4.load_model(tmp_path)


def test_invalid_config_names_the_field(tmp_path):
    d = CFG.to_hf_dict()
    d["o_groups"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(dsv4.ConfigError, match="o_groups"):
        dsv4.load_model(tmp_path)


def test_fp4_experts_need_an_fp4_checkpoint(tmp_path):
    dsv4.save_model(random_model(CFG), tmp_path)
    with pytest.raises(dsv4.CheckpointError, match="FP4"):
        dsv4.load_model(tmp_path, fp4_experts=True)


@pytest.mark.parametrize("crash_at", range(4))
def test_a_save_killed_at_any_step_leaves_a_whole_model(tmp_path, monkeypatch, crash_at):
    """Killed at each of save_model's renames and removals in turn (changing the shard layout, which used to
    leave an index naming deleted shards, or a silent mix of old and new shards): the directory loads as the
    old model or the new one, its tokenizer.json kept, and the next save cleans up and succeeds."""
    import os
    import shutil

    import dsv4.checkpoint as ck

    path = tmp_path / "model"
    a, b, c = (random_model(CFG, seed=s) for s in (1, 2, 3))
    dsv4.save_model(a, path)  # one file
    (path / "tokenizer.json").write_text("{}")
    ops, real_replace, real_rmtree = [], os.replace, shutil.rmtree

    class Killed(BaseException):
        pass

    def op(real):
        def run(*args, **kw):
            ops.append(args[0])
            if len(ops) - 1 == crash_at:
                raise Killed
            if len(ops) - 1 > crash_at:  # dead: nothing after the kill happens, its `finally` cleanup included
                return None
            return real(*args, **kw)
        return run
    monkeypatch.setattr(ck.os, "replace", op(real_replace))
    monkeypatch.setattr(ck.shutil, "rmtree", op(real_rmtree))
    with pytest.raises(Killed):
        dsv4.save_model(b, path, max_shard_bytes=150_000)  # sharded: another layout
    monkeypatch.undo()
    with pytest.warns(UserWarning) if not path.exists() else __import__("contextlib").nullcontext():
        got = dsv4.load_model(path, dtype=torch.float32).embed.weight
    assert torch.equal(got, a.embed.weight) or torch.equal(got, b.embed.weight)
    assert (path if path.exists() else tmp_path / "model.old").joinpath("tokenizer.json").exists()
    dsv4.save_model(c, path)
    assert torch.equal(dsv4.load_model(path, dtype=torch.float32).embed.weight, c.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_shards_are_byte_for_byte_what_safetensors_writes(tmp_path):
    """The shard writer (which streams a stacked tensor part by part) writes the bytes safetensors' save_file
    writes with metadata {"format": "pt"}: tensors ordered by dtype, then name; the JSON header; its padding."""
    import dsv4.checkpoint as ck

    g = torch.Generator().manual_seed(0)

    def random_bytes(dtype, shape):
        n = torch.Size(shape).numel()
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=g).bool()
        return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)

    tensors = {f"{name}.{i}": random_bytes(dtype, shape) for i, dtype in enumerate(ck._SAFETENSORS_DTYPES)
               for name, shape in (("w", (3, 5)), ("b", (7,)), ("scalar", ()), ("empty", (0, 3)))}
    tensors.update({"A": torch.zeros(1), "a.10": torch.ones(2), "a.9": torch.ones(3), "q\"uoté": torch.ones(1)})
    w1, w3 = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    for k in range(1, 4):  # a few header lengths, so the padding varies
        cases = {**dict(list(tensors.items())[:-k]), "gate_up": torch.cat([w1, w3], dim=1)}
        save_file(cases, str(tmp_path / "want"), metadata={"format": "pt"})
        ck._save_shard(tmp_path / "got", {**cases, "gate_up": ck._Stacked((4, 6, 5), torch.float32,
                                                                           ck._by_expert(w1, w3))})
        assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()
    dsv4.save_official(random_model(CFG), tmp_path / "official", max_shard_bytes=150_000)
    for f in sorted((tmp_path / "official").glob("*.safetensors")):  # every dtype of the official layout
        save_file(load_file(str(f)), str(tmp_path / "again"), metadata={"format": "pt"})
        assert f.read_bytes() == (tmp_path / "again").read_bytes(), f.name


@pytest.mark.parametrize("save", [dsv4.save_model, dsv4.save_official], ids=["hf", "official"])
def test_two_shards_get_an_index_naming_each_tensors_shard(tmp_path, save):
    """A limit one byte under the whole model: exactly two shards, and the index transformers needs to find
    them (one shard has none)."""
    model = random_model(CFG)
    save(model, tmp_path / "one")
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    total = sum(v.numel() * v.element_size() for v in load_file(str(tmp_path / "one" / "model.safetensors")).values())
    save(model, tmp_path / "two", max_shard_bytes=total - 1)
    shards = sorted(f.name for f in (tmp_path / "two").glob("*.safetensors"))
    assert len(shards) == 2 and all(name.endswith("-of-00002.safetensors") for name in shards)
    assert (tmp_path / "two" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())
    where = {k: name for name in shards for k in load_file(str(tmp_path / "two" / name))}
    assert index["weight_map"] == where and index["metadata"]["total_size"] == total
    got, want = dsv4.load_model(tmp_path / "two").state_dict(), dsv4.load_model(tmp_path / "one").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_save_is_atomic_previous_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    model = random_model(CFG, seed=1)
    dsv4.save_model(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import dsv4.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "_save_shard", boom)
    with pytest.raises(OSError):
        dsv4.save_model(random_model(CFG, seed=2), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    dsv4.load_model(tmp_path)


PEAK_SCRIPT = r"""
import sys, torch, dsv4
from dsv4.checkpoint import _read_config, build_model
from pathlib import Path


def hwm():  # peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


base = hwm()
if sys.argv[2] == "load":
    m = dsv4.load_model(sys.argv[1], dtype=torch.float32)
else:  # the same model built and filled in place: the floor any loader pays
    m = build_model(_read_config(Path(sys.argv[1])), torch.float32)
    for t in list(m.parameters()) + list(m.buffers()):
        t.data.zero_()
model_bytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(base, hwm(), model_bytes)
"""


@pytest.mark.parametrize("layout", ["official", "hf"])
def test_loading_streams_shards_peak_memory(tmp_path, layout):
    """Loading costs at most about one shard's worth of memory more than building the model in place."""
    cfg = dsv4.Config.tiny(hidden_size=256, moe_intermediate_size=256, n_routed_experts=32, vocab_size=4096)
    save = dsv4.save_official if layout == "official" else dsv4.save_model
    save(random_model(cfg), tmp_path, max_shard_bytes=8 << 20)
    shards = sorted(tmp_path.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    total = sum(f.stat().st_size for f in shards)

    def growth(mode):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), mode], capture_output=True,
                             text=True, check=True).stdout.split()
        base, peak, model_bytes = map(int, out)
        return peak - base, model_bytes

    floor, model_bytes = growth("build")
    load, _ = growth("load")
    print(f"\n{layout}: load peak growth {load / 2**20:.1f} MiB vs building in place {floor / 2**20:.1f} MiB; "
          f"model {model_bytes / 2**20:.1f} MiB (fp32); checkpoint {total / 2**20:.1f} MiB in {len(shards)} shards, "
          f"largest {largest / 2**20:.1f} MiB")
    # a shard read plus its dequantised fp32 copy; loading everything at once would add the whole checkpoint
    assert load - floor < 2 * largest + (32 << 20)


def test_init_random_initialises_every_tensor():
    from dsv4.checkpoint import build_model, init_random

    for _ in range(3):  # build_model leaves memory uninitialised: nothing may stay that way
        m = init_random(build_model(CFG), seed=0)
        for name, t in m.state_dict().items():
            assert torch.isfinite(t.float()).all(), name
        assert all(torch.equal(b, torch.zeros_like(b)) for n, b in m.named_buffers() if n.endswith("gate.bias"))
