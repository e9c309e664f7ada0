"""The batched decode function (eager and compiled ahead of time) against the full forward."""
import pytest
import torch

import dsv4
from dsv4.config import CSA, HCA, SLIDING
from dsv4.engine.engine import LLMEngine
from dsv4.model.cache import StatePool, new_cache
from dsv4.model import aot, decode
from dsv4.model.decode import BatchDecoder
from helpers import random_model

# HCA first, short windows and ratios: 40 decode steps cross many window and HCA-block boundaries
CFG = dsv4.Config.tiny(layer_types=[HCA, CSA, SLIDING, CSA], num_hidden_layers=4, hca_compress_ratio=8,
                       sliding_window=8, num_hash_layers=1, index_n_heads=8, index_topk=4)


def decode_vs_full(model, decoder, starts, steps, seed=0, general_every=0):
    """Prefill each sequence to starts[j] tokens (general path), then decode `steps` tokens for all at once
    with `decoder` (every `general_every`-th step through the general path instead, as the engine does
    when a step mixes in prefill); -> max |logit difference| against the full forward at every decoded position."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 512, (n + steps,), generator=g) for n in starts]
    slots = [decoder.pool.acquire() for _ in starts]
    caches = [new_cache(model, pool=decoder.pool, slot=s) for s in slots]
    worst = 0.0
    with torch.no_grad():
        for c, row, n in zip(caches, ids, starts):
            if n:
                model.step([row[:n]], [c])
        for t in range(steps):
            new = [row[n + t:n + t + 1] for row, n in zip(ids, starts)]
            if general_every and t % general_every == general_every - 1:
                logits = model.logits(model.step(new, caches)[None])[0]
            else:
                logits = decoder(caches, slots, [int(x) for x in new])
            for j, (row, n) in enumerate(zip(ids, starts)):
                full = model(row[None, :n + t + 1])[0, -1]
                worst = max(worst, (logits[j] - full).abs().max().item())
    for s in slots:
        decoder.pool.release(s)
    return worst


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=2)


def test_batched_decode_matches_full_forward(model):
    decoder = BatchDecoder(model, StatePool(model, 4))
    assert decode_vs_full(model, decoder, [0, 5, 23], 40) <= 1e-4  # empty cache, mid-window, several blocks in
    # entries appended by general steps in between: the decoder's batch copy of them must not go stale
    assert decode_vs_full(model, decoder, [2, 9], 40, seed=3, general_every=3) <= 1e-4


def test_a_bf16_state_under_an_fp32_model_does_not_depend_on_where_chunks_are_cut(model):
    """A chunk attended to its own keys in fp32 while a 1-token step read them back from the bf16 ring, so
    a seeded request's tokens changed with the engine's token budget (logits 1e-3 apart here)."""
    ids = torch.randint(2, 512, (20,), generator=torch.Generator().manual_seed(0))
    a, b = new_cache(model, torch.bfloat16), new_cache(model, torch.bfloat16)
    with torch.no_grad():
        model.step([ids[:18]], [a])
        model.step([ids[:18]], [b])
        one = model.logits(model.step([ids[18:20]], [a])[None])[0][1]  # one chunk of 2
        model.step([ids[18:19]], [b])
        two = model.logits(model.step([ids[19:20]], [b])[None])[0][0]  # two 1-token steps
    assert (one - two).abs().max() <= 1e-5


def test_bf16_checkpoint_decodes_in_bf16(model, tmp_path):
    """A bf16 model keeps its mHC, norm, sink and ape parameters in fp32 (load_model, as the reference):
    the engine's storage dtype and the batched decoder follow the activations' dtype, not the first
    parameter's (an fp32 store beside bf16 activations crashed the first decode step)."""
    dsv4.save_model(model, tmp_path)
    bf = dsv4.load_model(tmp_path, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.hc_head_fn.dtype == torch.float32
    engine = LLMEngine(bf)
    assert engine.dtype == torch.bfloat16 and engine.decoder is not None
    # bf16 rounding only: the bf16 full forward of these weights is itself 0.21 from the fp32 one
    # (logits up to ~1.6); a missed entry or window slot moves logits by their whole scale
    assert decode_vs_full(bf, BatchDecoder(bf, StatePool(bf, 4)), [0, 5, 23], 40) <= 0.35
    outs = dsv4.LLM(bf).generate([[5, 6, 7, 8, 9], [9, 8, 7]],
                                 dsv4.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [6, 6]


def test_compiled_decode_small_model_and_its_disk_cache(monkeypatch):
    """Two layers (CSA with its indexer, HCA): both artifacts (batch 1, larger batches) equal the full
    forward; a fresh AOTStep (as in a later process) loads them from disk without compiling."""
    small = random_model(dsv4.Config.tiny(layer_types=[CSA, HCA], num_hidden_layers=2, hca_compress_ratio=8,
                                          sliding_window=8, num_hash_layers=1, index_n_heads=8, index_topk=4),
                         seed=4)
    decoder = BatchDecoder(small, StatePool(small, 4), compile=True)
    assert decode_vs_full(small, decoder, [13], 12, seed=1) <= 1e-4
    assert decode_vs_full(small, decoder, [2, 21], 12, seed=2) <= 1e-4

    def no_compile(*a, **k):
        raise AssertionError("compiled again: the artifact was not found on disk")
    monkeypatch.setattr(aot.torch._inductor, "aoti_compile_and_package", no_compile)
    again = BatchDecoder(small, StatePool(small, 3))
    again.core = aot.AOTStep(decode._core)
    assert decode_vs_full(small, again, [30], 4, seed=3) <= 1e-4
    assert decode_vs_full(small, again, [1, 6, 9], 4, seed=4) <= 1e-4


@pytest.mark.slow  # four layers: a few minutes of compilation on a 2-core CPU with a cold cache
def test_compiled_decode_matches_full_forward(model):
    decoder = BatchDecoder(model, StatePool(model, 4), compile=True)
    assert decode_vs_full(model, decoder, [17], 24, seed=1) <= 1e-4  # batch 1: its own graph
    assert decode_vs_full(model, decoder, [3, 30], 24, seed=2) <= 1e-4  # any batch >= 2: one dynamic graph


def test_pool_slots_are_reset_and_released(model):
    eng = LLMEngine(model, config=dsv4.EngineConfig(max_num_seqs=2, prefix_block=0))
    params = dsv4.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    first = [eng.add_request(list(range(3, 40)), params) for _ in range(3)]  # the third waits for a free slot
    while eng.has_unfinished():
        eng.step()
    assert sorted(eng.pool.free) == [0, 1] and eng.decoder._batched is None  # nothing held for finished sequences
    again = eng.add_request(list(range(3, 40)), params)  # a reused slot starts from an empty state
    while eng.has_unfinished():
        eng.step()
    assert again.output_ids == first[0].output_ids == first[2].output_ids


def test_warmup_leaves_no_trace(model):
    eng = LLMEngine(model, config=dsv4.EngineConfig(max_num_seqs=2))
    eng.warmup()
    assert not eng.has_unfinished() and sorted(eng.pool.free) == [0, 1]
    assert set(eng.stats.values()) == {0}
