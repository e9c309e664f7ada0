"""Training loop: loss goes down, kill-and-resume is bitwise exact, checkpoints are atomic, balancing works."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dsv4
from dsv4.train import TrainConfig, Trainer
from helpers import random_model

CFG = dsv4.Config.tiny(vocab_size=128)


def tokens(n=20_000, seed=0):
    rng = np.random.default_rng(seed)  # a learnable stream: a noisy repeating pattern
    base = np.tile(np.arange(2, 50), n // 48 + 1)[:n]
    return np.where(rng.random(n) < 0.1, rng.integers(0, 128, n), base).astype(np.int32)


def make(steps=8):
    torch.manual_seed(0)
    return Trainer(random_model(CFG, seed=1), tokens(), TrainConfig(steps=steps, batch_size=4, seq_len=32, warmup=2))


def test_loss_decreases_and_mtp_is_trained():
    t = make(steps=30)
    stats = [t.step() for _ in range(30)]
    assert stats[-1]["loss"] < 0.6 * stats[0]["loss"]
    assert stats[-1]["mtp_loss"] < stats[0]["mtp_loss"]


def test_schedule_warms_up_holds_and_decays_to_a_tenth_at_the_last_step():
    cfg = TrainConfig(steps=10, warmup=2, decay_frac=0.3)  # decay over steps 7, 8, 9
    assert [cfg.lr_factor(i) for i in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.55, 0.1])


def test_schedule_decays_the_last_ceil_steps_x_decay_frac_steps_even_one_or_at_float_edges():
    """The window is the last ceil(steps x decay_frac) steps in exact arithmetic: 90 x 0.3 is 27, not the 28 that
    int(90 x 0.7 = 62.99999999999999) made; 10 x 0.8 is 8, not 9. The factor falls linearly from 1 at the window's
    first step to 0.1 at the last; a one-step window (which used to stay at 1, and the MTP weight at 0.3) is the
    last step at 0.1, the line starting one step earlier."""
    for steps in [*range(1, 61), 90, 100]:
        for hundredths in range(0, 101, 5):
            cfg = TrainConfig(steps=steps, warmup=0, decay_frac=hundredths / 100)
            n = -(-steps * hundredths // 100)  # integers only: ceil(steps x hundredths / 100)
            line = max(n, 2) if n else 0  # steps from the line's start (factor 1) to the last step (0.1)
            want = [1.0 if i < steps - line else 1 - 0.9 * (i - steps + line) / (line - 1) for i in range(steps)]
            got = [cfg.lr_factor(i) for i in range(steps)]
            assert got == pytest.approx(want) and (n == 0 or got[-1] == pytest.approx(0.1)), (steps, hundredths)
            assert sum(f < 1 for f in got) == (0 if n == 0 else min(steps, max(n - 1, 1))), (steps, hundredths)


def test_mtp_weight_falls_in_a_one_step_decay_window():
    cfg = dsv4.Config.tiny(vocab_size=128, layer_types=["sliding_attention", "heavily_compressed_attention"] * 2)
    torch.manual_seed(0)
    t = Trainer(random_model(cfg, seed=1), tokens(),
                TrainConfig(steps=10, batch_size=2, seq_len=32, warmup=1, decay_frac=0.1, seq_balance_coef=0.0))
    for step, weight in ((8, 0.3), (9, 0.1)):  # the last step is the decay window
        t.step_count = step
        ids, _ = t.batch()
        with torch.no_grad():
            total, stats = t.loss(ids)
        assert total.item() == pytest.approx(stats["loss"] + weight * stats["mtp_loss"], rel=1e-6), step


def test_grad_clip_zero_means_no_clipping():
    """grad_clip = 0 turns clipping off (it used to scale every gradient by 0: nothing trained)."""
    torch.manual_seed(0)
    t = Trainer(random_model(CFG, seed=1), tokens(), TrainConfig(steps=4, batch_size=4, seq_len=32, warmup=1,
                                                                 grad_clip=0))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.step()
    grads = [p.grad for p in t.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_kill_and_resume_is_bitwise_exact(tmp_path):
    straight = make()
    want = [straight.step()["loss"] for _ in range(8)]
    first = make()
    got = [first.step()["loss"] for _ in range(4)]
    first.save(tmp_path / "ckpt")
    del first  # "killed"
    second = make()
    second.resume(tmp_path / "ckpt")
    got += [second.step()["loss"] for _ in range(4)]
    assert got == want


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    t = make()
    t.step()
    t.save(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    t.step()
    import dsv4.train.trainer as tr

    calls = {"n": 0}
    real = tr.save_file

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(tr, "save_file", flaky)
    with pytest.raises(OSError):
        t.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    fresh = make()
    fresh.resume(tmp_path / "ckpt")
    assert fresh.step_count == 1


def test_bias_updates_move_load_toward_balance():
    torch.manual_seed(0)
    model = random_model(CFG, seed=2)
    with torch.no_grad():  # a skewed router: expert 0 wins every top-k layer
        for layer in model.layers:
            if not layer.ffn.gate.hash:
                layer.ffn.gate.bias.zero_()
                layer.ffn.gate.bias[0] = 3.0
    t = Trainer(model, tokens(), TrainConfig(steps=200, batch_size=4, seq_len=32, lr_muon=0.0, lr_adamw=0.0,
                                             bias_update_speed=0.05))

    def imbalance():
        loads = [layer.ffn.last_load.float() for layer in model.layers if not layer.ffn.gate.hash]
        return sum((load.max() / load.mean()).item() for load in loads) / len(loads)

    t.step()
    start = imbalance()
    for _ in range(60):
        t.step()
    assert imbalance() < 0.6 * start


def test_sequence_balance_loss_hand_computed():
    from dsv4.model.moe import sequence_balance_loss

    E, S = 4, 4  # top-2 of 4 experts
    uniform = torch.ones(1, S, E)
    balanced = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert torch.isclose(sequence_balance_loss(uniform, balanced), torch.tensor(1.0))
    skewed_scores = torch.tensor([[[3.0, 1.0, 0.0, 0.0]] * S])  # P = (0.75, 0.25, 0, 0)
    skewed = torch.tensor([[[0, 1]] * S])  # f = (2, 2, 0, 0)
    assert torch.isclose(sequence_balance_loss(skewed_scores, skewed), torch.tensor(2 * 0.75 + 2 * 0.25))


def test_per_expert_loads_are_in_the_step_metrics():
    cfg = dsv4.Config.tiny(vocab_size=128)
    model = random_model(cfg, seed=2)
    tokens = np.tile(np.arange(2, 60), 50).astype(np.int32)
    stats = Trainer(model, tokens, TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=1)).step()
    topk_layers = [i for i in range(cfg.num_hidden_layers) if not cfg.is_hash_layer(i)]
    assert sorted(stats["expert_load"]) == sorted([f"layers.{i}.ffn" for i in topk_layers] + ["mtp.0.ffn"])
    for name, counts in stats["expert_load"].items():  # every token picks top-k experts (MTP: S - 1 per row)
        n_tokens = 2 * (15 if name.startswith("mtp") else 16)
        assert len(counts) == cfg.n_routed_experts and sum(counts) == n_tokens * cfg.num_experts_per_tok
    assert stats["load_max_over_mean"] >= 1.0


@pytest.mark.slow  # compilation takes minutes on a 2-core CPU
def test_compiled_training_matches_eager():
    """[train] compile = true: the same losses as the eager step (fp32), step after step, MoE routing included."""
    eager = make()
    want = [eager.step() for _ in range(3)]
    torch.manual_seed(0)
    compiled = Trainer(random_model(CFG, seed=1), tokens(),
                       TrainConfig(steps=8, batch_size=4, seq_len=32, warmup=2, compile=True))
    got = [compiled.step() for _ in range(3)]
    for w, g in zip(want, got):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)
        assert g["mtp_loss"] == pytest.approx(w["mtp_loss"], rel=1e-4)
        assert g["expert_load"] == w["expert_load"]


def test_a_kill_at_any_point_of_save_leaves_a_checkpoint_and_later_saves_work(tmp_path, monkeypatch):
    """Each file operation of save() in turn is where the process dies (nothing after it runs, `finally` blocks
    included), with a stale ckpt.old and temporary from an earlier kill already there."""
    import os
    import shutil

    import dsv4.train.trainer as tr

    t = make()
    t.step()
    t.save(tmp_path / "ckpt")
    t.step()
    real = {"save_file": tr.save_file, "replace": os.replace, "rmtree": shutil.rmtree}

    class Killed(BaseException):
        pass

    # rmtree(stale temporary), save_file x2, rmtree(stale old), replace x2, rmtree(old), rmtree(tmp)
    for kill_at in range(1, 9):
        run = tmp_path / f"run{kill_at}"
        shutil.copytree(tmp_path / "ckpt", run / "ckpt")
        shutil.copytree(tmp_path / "ckpt", run / "ckpt.old")
        (run / ".ckpt.tmp-stale").mkdir()
        ops = {"n": 0, "kill_at": kill_at}

        def dying(name, ops=ops):
            def op(*a, **k):
                ops["n"] += 1
                if ops["n"] == ops["kill_at"]:
                    raise Killed
                if ops["n"] < ops["kill_at"]:
                    return real[name](*a, **k)
            return op
        with monkeypatch.context() as m:
            for name, target in (("save_file", tr), ("replace", os), ("rmtree", shutil)):
                m.setattr(target, name, dying(name))
            with pytest.raises(Killed):
                t.save(run / "ckpt")
        assert ops["n"] >= kill_at  # the kill happened (later calls: a dead process, no-ops)
        resumed = make()
        resumed.resume(run / "ckpt")
        assert resumed.step_count in (1, 2), kill_at
        resumed.step()
        resumed.save(run / "ckpt")  # the leftovers of the kill do not stand in the way
        assert sorted(p.name for p in run.iterdir()) == ["ckpt"], kill_at
        again = make()
        again.resume(run / "ckpt")
        assert again.step_count == resumed.step_count


def test_resume_after_a_kill_between_the_renames_uses_the_previous_checkpoint(tmp_path):
    t = make()
    t.step()
    t.save(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    fresh = make()
    fresh.resume(tmp_path / "ckpt")
    assert fresh.step_count == 1


def _truncate(f):
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
    (lambda c: _truncate(c / "trainer.json"), "trainer.json"),
    (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors"),
    (lambda c: [f.unlink() for f in c.iterdir()], "trainer.json"),
], ids=["truncated-model", "truncated-trainer-json", "no-optimizer", "empty"])
def test_damaged_checkpoint_is_a_clear_error_or_falls_back_to_the_previous_one(tmp_path, capsys, damage, named):
    import shutil

    from dsv4.checkpoint import CheckpointError

    t = make()
    t.step()
    t.save(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "ckpt.old")  # as if killed before removing the old one
    damage(tmp_path / "ckpt")
    fresh = make()
    fresh.resume(tmp_path / "ckpt")
    assert fresh.step_count == 1
    err = capsys.readouterr().err
    assert named in err and "ckpt.old" in err
    shutil.rmtree(tmp_path / "ckpt.old")
    with pytest.raises(CheckpointError, match=named):
        make().resume(tmp_path / "ckpt")


def test_resume_with_another_model_config_names_the_differing_fields(tmp_path):
    from dsv4.checkpoint import CheckpointError

    t = make()
    t.save(tmp_path / "ckpt")
    torch.manual_seed(0)
    other = Trainer(random_model(dsv4.Config.tiny(vocab_size=128, hidden_size=96, rope_theta=5e4), seed=1),
                    tokens(), TrainConfig(steps=8, batch_size=4, seq_len=32, warmup=2))
    with pytest.raises(CheckpointError, match=r"trainer.json.*hidden_size 64 .* vs 96 .*rope_theta"):
        other.resume(tmp_path / "ckpt")


def test_resume_with_other_train_settings_names_each_with_both_values(tmp_path):
    """Trainer.resume refuses a TrainConfig that differs from the checkpoint's (weight_decay used to be dropped for
    the saved param_groups' while the next checkpoint recorded the new value); device and compile may differ."""
    from dsv4.checkpoint import CheckpointError

    t = make()
    t.step()
    t.save(tmp_path / "ckpt")
    torch.manual_seed(0)
    other = Trainer(random_model(CFG, seed=1), tokens(),
                    TrainConfig(steps=8, batch_size=4, seq_len=48, warmup=2, weight_decay=0.5))
    with pytest.raises(CheckpointError, match=r"seq_len 32 \(checkpoint\) vs 48 \(now\); \[train\] weight_decay 0.1 "
                                              r"\(checkpoint\) vs 0.5 \(now\)\. --resume continues"):
        other.resume(tmp_path / "ckpt")
    same = Trainer(random_model(CFG, seed=1), tokens(),
                   TrainConfig(steps=8, batch_size=4, seq_len=32, warmup=2, device="cpu"))
    same.resume(tmp_path / "ckpt")
    assert same.step_count == 1


def small(**kw):
    """A fresh Trainer on CFG with 2 rows of 16 tokens (fast steps); kw: TrainConfig fields."""
    torch.manual_seed(0)
    return Trainer(random_model(CFG, seed=1), tokens(), TrainConfig(**{"steps": 4, "batch_size": 2, "seq_len": 16,
                                                                      "warmup": 1, **kw}))


def hand_losses(model, ids, mask=None):
    """(next-token CE, MTP CE) with plain F.cross_entropy: position t of ids[:, :-1] predicts ids[:, t+1]; the MTP
    module at t, given token ids[:, t+1], predicts ids[:, t+2]. mask [B, S+1]: only targets whose mask is 1 count."""
    logits, mtp = model(ids[:, :-1], ids[:, 1:-1])
    V = logits.shape[-1]
    main = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    two_ahead = F.cross_entropy(mtp.reshape(-1, V), ids[:, 2:].reshape(-1), reduction="none")
    if mask is None:
        return main.mean(), two_ahead.mean()
    m1, m2 = mask[:, 1:].reshape(-1), mask[:, 2:].reshape(-1)
    return (main * m1).sum() / m1.sum(), (two_ahead * m2).sum() / m2.sum()


@pytest.mark.parametrize("masked", [False, True], ids=["all-tokens", "masked"])
def test_loss_is_next_token_ce_plus_weighted_mtp_ce_on_the_token_two_ahead(masked):
    """With the balance and indexer losses off: total = CE(logits, the next tokens) + 0.3 * CE(MTP logits, the tokens
    two ahead); masked, each CE averages over its own targets with mask 1."""
    t = small(seq_balance_coef=0.0, indexer_loss_weight=0.0, mtp_weight=0.3)
    ids, _ = t.batch()
    mask = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.6).float() if masked else None
    with torch.no_grad():
        total, stats = t.loss(ids, mask)
        main, two_ahead = hand_losses(t.model, ids, mask)
    assert stats["loss"] == pytest.approx(main.item(), rel=1e-6)
    assert stats["mtp_loss"] == pytest.approx(two_ahead.item(), rel=1e-6)
    assert total.item() == pytest.approx(main.item() + 0.3 * two_ahead.item(), rel=1e-6)


def test_total_loss_adds_the_weighted_balance_and_indexer_losses():
    """total = CE + mtp_weight * CE_mtp + seq_balance_coef * mean(balance losses of the top-k MoE layers, MTP's
    included) + indexer_loss_weight * mean(indexer KL losses of the CSA layers), with coefficients large enough to see."""
    from dsv4.model.attention import Attention
    from dsv4.model.moe import MoE

    t = small(seq_balance_coef=0.5, indexer_loss_weight=0.7, mtp_weight=0.3)
    ids, _ = t.batch()
    total, stats = t.loss(ids)
    balance = [m.balance_loss for m in t.model.modules() if isinstance(m, MoE) and m.balance_loss is not None]
    kl = [a.indexer_loss for a in t.model.modules() if isinstance(a, Attention) and a.indexer_loss is not None]
    topk = [i for i in range(CFG.num_hidden_layers) if not CFG.is_hash_layer(i)]
    assert len(balance) == len(topk) + 1 and len(kl) == CFG.layer_types.count("compressed_sparse_attention")
    balance, kl = sum(b.item() for b in balance) / len(balance), sum(k.item() for k in kl) / len(kl)
    assert 0.5 * balance > 0.1 and 0.7 * kl > 0.01  # terms large enough to show in the total
    with torch.no_grad():
        main, two_ahead = hand_losses(t.model, ids)
    assert stats["balance_loss"] == pytest.approx(balance, rel=1e-6)
    assert stats["indexer_loss"] == pytest.approx(kl, rel=1e-6)
    want = main.item() + 0.3 * two_ahead.item() + 0.5 * balance + 0.7 * kl
    assert total.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("clip", [0.5, 1e3], ids=["norm-above-cap", "norm-below-cap"])
def test_grad_clip_caps_the_gradient_norm_and_reports_the_unclipped_one(clip):
    """After step() the gradients are the backward's scaled by min(1, clip / norm) (norm: sqrt of the sum of all
    squared entries), so their norm is min(clip, norm); stats["grad_norm"] is the norm before clipping."""
    ref = small(grad_clip=clip)  # the backward of the same first batch, by hand
    ids, _ = ref.batch()
    ref.loss(ids)[0].backward()
    raw = [p.grad for p in ref.model.parameters()]
    norm = sum(g.double().square().sum() for g in raw if g is not None).sqrt().item()
    t = small(grad_clip=clip)
    stats = t.step()
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-5)
    got = [p.grad for p in t.model.parameters()]
    assert norm > 1.0  # clip 0.5 clips, clip 1e3 does not
    for g, r in zip(got, raw):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.allclose(g, r * min(1.0, clip / norm), rtol=1e-4, atol=1e-9)
    clipped = sum(g.double().square().sum() for g in got if g is not None).sqrt().item()
    assert clipped == pytest.approx(min(clip, norm), rel=1e-5)


def test_each_step_runs_the_optimisers_at_base_lr_times_the_schedule():
    """The learning rate each optimiser steps with: warmup 3 gives 1/3, 2/3, then 1; the last ceil(8 x 0.25) = 2
    steps decay from 1 to 0.1. And the first AdamW step moves each entry with a non-zero gradient by exactly its
    lr (Adam's bias-corrected first step is lr * g / |g|; no weight decay on AdamW's group)."""
    t = small(steps=8, warmup=3, decay_frac=0.25, lr_muon=0.02, lr_adamw=3e-3)
    factors = [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 0.1]
    seen = []
    for i, opt in enumerate(t.opts):
        def recording(*a, opt=opt, real=opt.step, i=i, **k):
            seen.append((i, [g["lr"] for g in opt.param_groups]))
            return real(*a, **k)
        opt.step = recording
    adamw = [p for g in t.opts[1].param_groups for p in g["params"]]
    before = [p.detach().clone() for p in adamw]
    for step, f in enumerate(factors):
        t.step()
        assert seen == [(0, [pytest.approx(0.02 * f)]), (1, [pytest.approx(3e-3 * f)])], step
        seen.clear()
        if step == 0:
            moved = 0
            for p, p0 in zip(adamw, before):
                big = p.grad.abs() > 1e-4  # where Adam's eps (1e-8) shifts the step by < 1e-4
                assert torch.allclose((p.detach() - p0)[big].abs(), torch.tensor(3e-3 / 3), rtol=1e-3)
                moved += int(big.sum())
            assert moved > 100
