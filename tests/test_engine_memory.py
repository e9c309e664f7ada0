"""Engine memory and prefix cache under a self-hoster's conditions: batch-mates of different lengths,
a chain longer than the cache cap, speculative hits, odd or failing files in the cache dir, a closed AsyncLLM."""
import asyncio
import copy
import errno
import shutil

import pytest
import torch

import dsv4
from dsv4.engine import AsyncLLM
from dsv4.engine.engine import LLMEngine, model_tag
from dsv4.model.cache import new_cache
from helpers import random_model

GREEDY = dsv4.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(dsv4.Config.tiny(index_n_heads=8), seed=0)


def prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in lengths]


def cold(model, p):
    return dsv4.LLM(model, prefix_block=0).generate(p, GREEDY).token_ids


def test_batched_decode_does_not_grow_a_short_sequence_to_its_long_batch_mate(model):
    """The batched decode padded every sequence's entry store to the longest one's size, for good: memory
    the budget never counted (8 short sequences next to a 2,000-token one held ~5x what used_bytes said)."""
    eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0))
    _, short = (eng.add_request(p, GREEDY) for p in prompts(600, 5, seed=1))
    while eng.has_unfinished():
        eng.step()
        if short.cache is not None:
            assert short.cache.nbytes(allocated=True) == new_cache(model).nbytes(allocated=True)
    assert short.output_ids == cold(model, short.prompt)


def test_a_chain_longer_than_the_cache_cap_keeps_hitting_its_first_blocks(model):
    """LRU evicted a chain's first block to make room for its last ones (leaving them unreachable), and the
    recompute re-inserted it evicting the next: a prompt longer than the cap never hit again."""
    p = prompts(16 * 8 + 1, seed=2)[0]  # 8 full blocks
    probe = dsv4.LLM(model, prefix_block=16)
    probe.generate(p, GREEDY)
    block = probe.engine.prefix.bytes // len(probe.engine.prefix.blocks)
    llm = dsv4.LLM(model, prefix_block=16, prefix_cache_bytes=6 * block + block // 2)  # 6 of the 8 fit
    llm.generate(p, GREEDY)
    for _ in range(2):
        out = llm.generate(p, GREEDY)
        assert out.cached_tokens == 6 * 16 and out.token_ids == cold(model, p)
        assert llm.engine.prefix.bytes <= 6 * block + block // 2


def test_the_memory_cache_evicts_the_least_recently_used_block(model):
    """17-token prompts leave one 16-token block each; a cap of 2.5 blocks holds two. The third block evicts
    the least recently used: the oldest inserted, or, after a hit on it, the other one."""
    a, b, c = prompts(17, 17, 17, seed=9)
    probe = dsv4.LLM(model, prefix_block=16)
    probe.generate(a, GREEDY)
    assert len(probe.engine.prefix.blocks) == 1
    block = probe.engine.prefix.bytes
    cap = 2 * block + block // 2

    def llm_after(*ps):
        llm = dsv4.LLM(model, prefix_block=16, prefix_cache_bytes=cap)
        return llm, [llm.generate(p, GREEDY).cached_tokens for p in ps]

    llm, hits = llm_after(a, b, c)
    assert hits == [0, 0, 0]
    out = llm.generate(b, GREEDY)
    assert out.cached_tokens == 16 and out.token_ids == cold(model, b)
    assert llm.generate(a, GREEDY).cached_tokens == 0
    llm, hits = llm_after(a, b, a, c)
    assert hits == [0, 0, 16, 0]
    out = llm.generate(a, GREEDY)
    assert out.cached_tokens == 16 and out.token_ids == cold(model, a)
    assert llm.generate(b, GREEDY).cached_tokens == 0


def test_a_hit_restores_the_mtp_layer_as_of_the_block_end(model):
    """With speculative decoding, a block recorded the MTP layer's window at the end of the step's MTP
    segment (here position 100), not at the block's end (96): after a hit the MTP state, so the drafts,
    differed from a cold run's."""
    p = prompts(100, seed=3)[0]

    def mtp_window_after_first_step(eng, prompt):
        s = eng.add_request(prompt, GREEDY)
        eng.step()  # the whole prompt
        window = s.cache.mtp[0].window.clone()
        while eng.has_unfinished():
            eng.step()
        assert s.output_ids == cold(model, prompt)
        return s.cached_tokens, window

    _, want = mtp_window_after_first_step(LLMEngine(model, config=dsv4.EngineConfig(
        prefix_block=0, num_speculative_tokens=1)), p[:98])
    eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=16, num_speculative_tokens=1))
    mtp_window_after_first_step(eng, p)
    n, got = mtp_window_after_first_step(eng, p[:98])
    assert n == 96 and (got - want).abs().max() < 1e-4


def test_a_block_file_under_another_blocks_name_is_not_a_hit(model, tmp_path):
    """The checksum covered the tensors, not the key: a valid file of block B renamed to block A passed
    and restored B's state for A's tokens (wrong output)."""
    a, b = prompts(100, 100, seed=5)
    dsv4.LLM(model, prefix_cache_dir=str(tmp_path)).generate(a, GREEDY)
    fa = next(tmp_path.glob("*.safetensors"))
    dsv4.LLM(model, prefix_cache_dir=str(tmp_path)).generate(b, GREEDY)
    fb = next(f for f in tmp_path.glob("*.safetensors") if f != fa)
    shutil.copy(fb, fa)
    out = dsv4.LLM(model, prefix_cache_dir=str(tmp_path)).generate(a, GREEDY)
    assert out.cached_tokens == 0 and out.token_ids == cold(model, a)


def test_memory_pressure_preempts_the_newest_request_to_the_front_of_the_queue(model):
    """With the decode state over the budget the newest running request is preempted (the oldest keeps its
    progress) and goes back to the front of the queue, ahead of requests never admitted. Its usage counts
    its first admission only: the blocks its recompute hits are not reported as cached prompt tokens."""
    eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=16, max_num_seqs=2))
    a, b, c = (eng.add_request(p, GREEDY) for p in prompts(30, 40, 20, seed=7))
    eng.step()
    assert eng.running == [a, b] and list(eng.waiting) == [c]
    eng.cfg.kv_budget_bytes = eng.used_bytes() - 1
    eng.schedule()
    assert eng.running == [a] and list(eng.waiting) == [b, c]
    assert a.cache is not None and b.cache is None and eng.stats["preemptions"] == 1
    eng.cfg.kv_budget_bytes = 8 << 30
    while eng.has_unfinished():
        eng.step()
    assert [s.output_ids for s in (a, b, c)] == [cold(model, s.prompt) for s in (a, b, c)]
    assert [s.cached_tokens for s in (a, b, c)] == [0, 0, 0]
    assert (eng.stats["prompt_tokens"], eng.stats["cached_tokens"]) == (30 + 40 + 20, 0)


@pytest.mark.parametrize("odd", ["no metadata", "directory"])
def test_odd_files_in_the_cache_dir_are_misses(model, tmp_path, odd):
    """A safetensors file without metadata (AttributeError) or a directory under a block's name
    (IsADirectoryError) failed the step."""
    from safetensors.torch import save_file

    p = prompts(100, seed=5)[0]
    dsv4.LLM(model, prefix_cache_dir=str(tmp_path)).generate(p, GREEDY)
    f = next(tmp_path.glob("*.safetensors"))
    f.unlink()
    if odd == "no metadata":
        save_file({"L0.window": torch.zeros(1)}, str(f))
    else:
        f.mkdir()
    out = dsv4.LLM(model, prefix_cache_dir=str(tmp_path)).generate(p, GREEDY)
    assert out.cached_tokens == 0 and out.token_ids == cold(model, p)


def test_a_failed_disk_write_costs_only_the_disk_copy(model, tmp_path, monkeypatch):
    """A full disk (or a read-only directory) failed the whole step: every request in it ended with an error."""
    from dsv4.engine import prefix_cache

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(prefix_cache, "save_file", full)
    llm = dsv4.LLM(model, prefix_cache_dir=str(tmp_path))
    p = prompts(100, seed=6)[0]
    assert llm.generate(p, GREEDY).token_ids == cold(model, p)
    assert llm.generate(p, GREEDY).cached_tokens == 64  # the memory copy still serves
    assert not list(tmp_path.iterdir())  # no block files, no temporary files left


def test_model_tag_tells_apart_weights_that_differ_in_one_row(model):
    """The tag sampled 64 values per tensor: a model whose weights differ in one embedding row (a
    fine-tuned special token) shared the other's disk blocks and got wrong tokens from them."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.embed.weight[5] += 1.0
    assert model_tag(other) != model_tag(model)
    assert model_tag(copy.deepcopy(model)) == model_tag(model)
    # the same weights with simulated FP8 KV and FP4 indexer keys hold other decode state
    simulated = copy.deepcopy(model)
    simulated.config.quant_simulation = True
    assert model_tag(simulated) != model_tag(model)


def test_submit_after_close_is_refused(model):
    """After close() no thread steps the engine: a request submitted then waited forever."""
    allm = AsyncLLM(LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0)))
    allm.close()

    async def main():
        allm.submit([3, 4, 5], GREEDY)
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(main())
    assert not allm.engine.requests


@pytest.mark.parametrize("n,length", [(8, 20), (3, 1100)])
def test_allocated_decode_state_stays_within_the_budget(model, n, length):
    """The budget counts the rows allocated for entries (64 at first, then growth by 25%), not only the
    rows filled: sized for n sequences by the engine's own estimate, they used to hold up to 2.2x of it."""
    probe = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0))
    budget = n * probe.estimate_bytes(length + 4)
    eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0, kv_budget_bytes=budget, max_num_batched_tokens=4096))
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        eng.add_request(torch.randint(2, 500, (length,), generator=g).tolist(),
                        dsv4.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
        held = sum(s.cache.nbytes(allocated=True) for s in eng.running if s.cache is not None)
        assert held <= budget and eng.used_bytes() == held


def test_the_disk_cache_stays_under_its_cap_least_recently_used_first(model, tmp_path):
    """Without a cap the directory grew with every distinct prompt; killed writes' .tmp files stayed."""
    import os
    import time

    stale = tmp_path / "killed-write.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200,) * 2)
    probe = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=16, prefix_cache_dir=str(tmp_path / "one")))
    probe.add_request(prompts(17)[0], GREEDY)
    while probe.has_unfinished():
        probe.step()
    block = sum(f.stat().st_size for f in (tmp_path / "one").iterdir())  # one block's file
    cap = int(3.5 * block)
    cfg = dsv4.EngineConfig(prefix_block=16, prefix_cache_dir=str(tmp_path), prefix_cache_disk_bytes=cap,
                            prefix_cache_bytes=0)  # memory holds nothing: every hit comes from disk
    eng = LLMEngine(model, config=cfg)
    assert not stale.exists()
    files = lambda: {f.name: f.stat().st_size for f in tmp_path.glob("*.safetensors")}  # noqa: E731

    def run(p):
        s = eng.add_request(p, GREEDY)
        while eng.has_unfinished():
            eng.step()
        return s

    first = prompts(17, seed=100)[0]
    run(first)
    for i in range(8):
        run(prompts(17, seed=200 + i)[0])  # a new block on disk
        assert sum(files().values()) <= cap
        assert run(first).cached_tokens == 16  # from disk, and now the most recently used: kept
    assert 2 <= len(files()) <= 3
    # the trims removed the oldest new blocks, never the one just written
    assert run(prompts(17, seed=207)[0]).cached_tokens == 16
    assert run(prompts(17, seed=200)[0]).cached_tokens == 0


def test_the_batched_decoders_copy_counts_against_the_budget(model):
    """The batched decode step pads every sequence's entries to the longest one's, beside their own state:
    it runs only where that copy fits in the budget, else the sequences decode one by one (same tokens)."""
    ps = prompts(300, 10, 10, 10, seed=5)
    alone = [cold(model, p) for p in ps]
    probe = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0))
    budget = sum(probe.estimate_bytes(len(p) + GREEDY.max_tokens) for p in ps)  # the states, not the copy
    for kv, batched in ((budget, False), (8 << 30, True)):
        eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0, kv_budget_bytes=kv))
        seqs = [eng.add_request(p, GREEDY) for p in ps]
        used = False
        while eng.has_unfinished():
            eng.step()
            used |= eng.decoder._batched is not None
        assert used == batched
        assert [s.output_ids for s in seqs] == alone
