"""MTP speculative decoding: exact greedy, distribution-preserving sampling, rewind, MTP incremental state."""
import pytest
import torch

import dsv4
from dsv4.engine.engine import LLMEngine
from dsv4.model.cache import new_cache
from helpers import random_model

CFG = dsv4.Config.tiny(index_n_heads=8)
GREEDY = dsv4.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0)


def prompts(*lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def test_mtp_incremental_state_equals_full_mtp(model):
    ids = torch.randint(0, 512, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.mtp_logits(model.streams(ids[:, :-1]), ids[:, 1:])[0]
        cache = new_cache(model, torch.float32)
        got, p = [], 0
        for L in (5, 1, 1, 30, 32):
            X = model.step([ids[0, p:p + L]], [cache])
            got.append(model.mtp_step(X, [ids[0, p + 1:p + L + 1]], [cache])[0])
            p += L
    assert (torch.cat(got)[:69] - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy_with_mtp_drafts(model, k):
    ps = prompts(5, 70, 130)
    plain = dsv4.LLM(model).generate(ps, GREEDY)
    llm = dsv4.LLM(model, num_speculative_tokens=k, max_num_batched_tokens=48)
    spec = llm.generate(ps, GREEDY)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert llm.engine.stats["proposed"] > 0


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_drafts_are_the_mtp_modules_prediction_on_the_true_prefix(model, k, monkeypatch):
    """Each first draft is the MTP head's prediction from a full forward over the sequence so far:
    mtp_logits(streams(tokens[:-1]), tokens[1:])[-1], its argmax for a greedy request and, for a sampled one,
    its softmax at the request's temperature as the draft distribution. (Random drafts are rejected and
    greedy verification hides wrong ones: the outputs alone cannot tell.) Chunked prefill over prefix
    blocks, two requests batched, and k = 2 (chained drafts, whose MTP state is put back) included."""
    seen = []
    real_draft = LLMEngine._draft

    def spy(self, work, X):
        real_draft(self, work, X)
        for w in work:
            if w.seq.drafts:
                seen.append((list(w.seq.tokens), w.seq.params, w.seq.drafts[0], w.seq.draft_q[0].clone()))
    monkeypatch.setattr(LLMEngine, "_draft", spy)
    a, b = prompts(20, 45, seed=3)
    T = 0.8
    llm = dsv4.LLM(model, num_speculative_tokens=k, max_num_batched_tokens=24, prefix_block=16)
    torch.manual_seed(0)
    llm.generate([a, b], [dsv4.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                          dsv4.SamplingParams(max_tokens=10, temperature=T, ignore_eos=True)])
    assert len(seen) >= 10 and {p.greedy for _, p, _, _ in seen} == {True, False}
    with torch.no_grad():
        for toks, params, d, q in seen:
            ids = torch.tensor([toks])
            want = model.mtp_logits(model.streams(ids[:, :-1]), ids[:, 1:])[0, -1]
            if params.greedy:
                assert d == int(want.argmax()), len(toks)
            else:
                assert (q - (want / T).softmax(-1)).abs().max() <= 1e-5, len(toks)


def oracle_drafts(monkeypatch, plain: dict, k: int) -> None:
    """Replace MTP drafts by the plain run's next tokens, wrong every third time (the random model's own
    drafts are almost never accepted): acceptance, partial rejection and rewind all happen. The pattern is
    counted per sequence, so every sequence accepts alike."""
    real_draft = LLMEngine._draft
    calls = {}

    def oracle(self, work, X):
        real_draft(self, work, X)  # keeps the MTP layer's state moving as in real use
        for w in work:
            s = w.seq
            if s.drafts:
                truth = plain[tuple(s.prompt)][len(s.output_ids):] + [0] * k
                n = calls.get(id(s), 0)
                s.drafts = [truth[i] if (n + i) % 3 else (truth[i] + 1) % 512 for i in range(k)]
                calls[id(s)] = n + 1

    monkeypatch.setattr(LLMEngine, "_draft", oracle)


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_with_penalties_equals_plain(model, k, monkeypatch):
    """Each verified row is penalised for the accepted drafts before it (all rows were scored with the
    step's old counts, so a repeated token escaped its penalty)."""
    params = dsv4.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, presence_penalty=1.5,
                                 frequency_penalty=0.5)
    ps = prompts(5, 70, seed=4)
    plain = {tuple(p): o.token_ids for p, o in zip(ps, dsv4.LLM(model).generate(ps, params))}
    unpenalised = dsv4.LLM(model).generate(ps, GREEDY)
    assert [o.token_ids for o in unpenalised] != list(plain.values())  # the penalties shape the output
    oracle_drafts(monkeypatch, plain, k)
    llm = dsv4.LLM(model, num_speculative_tokens=k)
    assert [o.token_ids for o in llm.generate(ps, params)] == [plain[tuple(p)] for p in ps]
    assert 0 < llm.engine.stats["accepted"] < llm.engine.stats["proposed"]


@pytest.mark.parametrize("k", [1, 3])
def test_acceptance_and_rewind_with_oracle_drafts(model, k, monkeypatch):
    """Drafts that are right two times in three exercise acceptance, partial rejection and rewind
    (across compressor windows and prefix blocks); output must still equal plain greedy."""
    ps = prompts(5, 70, 130, seed=3)
    plain_llm = dsv4.LLM(model)
    plain = {tuple(p): o.token_ids for p, o in zip(ps, plain_llm.generate(ps, GREEDY))}
    steps_plain = plain_llm.engine.stats["steps"]
    assert steps_plain == 40  # all three prefilled in one step, then one token per step
    llm = dsv4.LLM(model, num_speculative_tokens=k)
    eng = llm.engine
    oracle_drafts(monkeypatch, plain, k)
    spec = llm.generate(ps, GREEDY)
    assert [o.token_ids for o in spec] == [plain[tuple(p)] for p in ps]
    assert 0 < eng.stats["accepted"] < eng.stats["proposed"]
    # every step gives each sequence one token plus its accepted drafts, and the sequences accept alike:
    # each accepted draft saves a step, except those the last step accepts past max_tokens (at most k)
    saved = eng.stats["accepted"] / len(ps)
    assert steps_plain - saved <= eng.stats["steps"] <= steps_plain - saved + k, (eng.stats, steps_plain)


def test_speculative_sampling_keeps_the_target_distribution():
    """Small vocabulary, temperature 0.7: the joint law of the first two sampled tokens with speculation
    (rejection sampling against the MTP drafts) is softmax(logits / 0.7) of the model's own full forwards,
    p(t0 | prompt) p(t1 | prompt, t0), within sampling noise (at temperature 1 it is 0.19 away in TV)."""
    cfg = dsv4.Config.tiny(vocab_size=8, index_n_heads=8, bos_token_id=0, eos_token_id=1)
    model = random_model(cfg, seed=4, std=0.3)
    p = prompts(6, seed=5, vocab=8)[0]
    N, T = 1500, 0.7
    with torch.no_grad():
        p0 = (model(torch.tensor([p]))[0, -1] / T).softmax(-1)
        p1 = (model(torch.tensor([p + [t] for t in range(8)]))[:, -1] / T).softmax(-1)
    want = p0[:, None] * p1
    llm = dsv4.LLM(model, num_speculative_tokens=1, prefix_block=0, max_num_seqs=256, max_num_batched_tokens=4096)
    torch.manual_seed(1)  # unseeded requests (seeded ones are not drafted) draw from torch's global stream
    outs = llm.generate([p] * N, dsv4.SamplingParams(max_tokens=2, temperature=T, ignore_eos=True))
    got = torch.zeros(8, 8)
    for o in outs:
        got[o.token_ids[0], o.token_ids[1]] += 1 / N
    stats = llm.engine.stats
    assert stats["accepted"] > 0.05 * stats["proposed"]  # both paths (accepted, resampled) are taken often
    tv = 0.5 * (got - want).abs().sum().item()
    assert tv < 0.05, tv


def test_seeded_sampling_is_the_same_with_speculation_and_any_token_budget(model):
    """Which drafts get verified depends on the step's token budget, so seeded sampled requests are not
    drafted: their tokens are those of a plain engine, however small the budget (they differed before)."""
    a, b = prompts(3, 3, seed=6)
    sp = [dsv4.SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    want = [o.token_ids for o in dsv4.LLM(model).generate([a, b], sp)]
    for budget in (2, 4, 5, 64):
        llm = dsv4.LLM(model, num_speculative_tokens=2, max_num_batched_tokens=budget)
        assert [o.token_ids for o in llm.generate([a, b], sp)] == want, budget


def test_drafts_left_unverified_by_the_budget_are_dropped(model):
    """With one token of budget a decoding sequence cannot verify drafts; they used to pile up every step."""
    eng = LLMEngine(model, config=dsv4.EngineConfig(num_speculative_tokens=2, max_num_batched_tokens=1,
                                                      prefix_block=0))
    s = eng.add_request(prompts(10)[0], GREEDY)
    most = 0
    while eng.has_unfinished():
        eng.step()
        most = max(most, len(s.drafts), len(s.draft_q))
    assert most <= 2 and s.output_ids == dsv4.LLM(model).generate(prompts(10)[0], GREEDY).token_ids


def test_speculation_needs_mtp(model, tmp_path):
    cfg = dsv4.Config.tiny(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP"):
        dsv4.LLM(random_model(cfg), num_speculative_tokens=1)


def test_speculative_greedy_equals_plain_greedy_where_indexer_scores_tie():
    """With random weights many indexer scores are exactly 0 (every head's ReLU 0) and the k-th best score
    often ties. A verify step scores rows of another length than a decode step, and torch.topk's choice
    among equal scores depends on the row: speculation once left plain greedy at token 22 here."""
    model = random_model(dsv4.Config.tiny(head_dim=80, qk_rope_head_dim=16), seed=2)
    ps = [list(range(3, 50)), list(range(100, 170)), [5, 9, 11]]
    sp = dsv4.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = [o.token_ids for o in dsv4.LLM(model).generate(ps, sp)]
    assert [o.token_ids for o in dsv4.LLM(model, num_speculative_tokens=2).generate(ps, sp)] == plain
