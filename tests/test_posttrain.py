"""Post-training: SFT data rendered like the server's prompts with the loss on assistant turns only,
GRPO advantages, the distillation loss, and `dsv4 train` for [rl] configs."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dsv4
from dsv4.server.devmodel import build_dev_model
from dsv4.train.rl import GRPO, RLConfig, group_advantages, reply_logits, reverse_kl
from dsv4.train.sft import ChatRenderer, build_sft_corpus
from dsv4.train.tasks import MAKERS, generate, reward, score
from dsv4.train.trainer import TrainConfig, Trainer

from helpers import assert_resume_refused, random_model


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    path = build_dev_model(tmp_path_factory.mktemp("dev-model"))
    return path, ChatRenderer(path)


def test_prompt_ids_equal_what_the_server_feeds_the_model(dev):
    from fastapi.testclient import TestClient

    from dsv4.engine import AsyncLLM, EngineConfig, LLMEngine
    from dsv4.server import ServerConfig, create_app

    path, renderer = dev
    model = dsv4.load_model(path, dtype=torch.float32)
    llm = AsyncLLM(LLMEngine(model, renderer.tokenizer, EngineConfig()))
    app = create_app(llm, str(path / "tokenizer.json"), ServerConfig())
    try:
        with TestClient(app) as client:
            for ex in generate(12, seed=5):
                body = {"model": "deepseek-v4-flash", "max_tokens": 1, **ex.body}
                r = client.post("/chat/completions", json=body)
                assert r.status_code == 200, r.text
                assert list(app.state.last_prompt_ids) == renderer.prompt_ids(ex.body), ex.kind
    finally:
        llm.close()


def test_mask_covers_exactly_the_assistant_turn(dev):
    _, renderer = dev
    for ex in generate(20, seed=7):
        ids, mask = renderer.example_ids(ex)
        prompt = [i for i, m in zip(ids, mask) if not m]
        target = [i for i, m in zip(ids, mask) if m]
        assert prompt == renderer.prompt_ids(ex.body)
        assert mask == [0] * len(prompt) + [1] * len(target)
        text = renderer.tokenizer.decode(target, skip_special_tokens=False)
        assert text == renderer.target_text(ex)
        assert text.endswith("<｜end▁of▁sentence｜>")
        thinking = ex.body["thinking"]["type"] == "enabled"
        assert ("</think>" in text) == thinking


def test_gold_replies_parse_and_score_one_and_wrong_ones_zero(dev):
    _, renderer = dev
    exs = generate(80, seed=11, mix={kind: 1 for kind in MAKERS})
    assert {ex.kind for ex in exs} == set(MAKERS) | {"tool_result"}
    for ex in exs:
        conv = renderer.conversation(ex.body)
        ids = renderer.tokenizer.encode(renderer.target_text(ex), add_special_tokens=False).ids
        msg = renderer.parse(conv, ids[:-1], True)
        assert score(ex, msg["content"], msg["tool_calls"]) == 1.0, (ex.kind, msg)
        if ex.tool_call:
            assert msg["tool_calls"] == [ex.tool_call]
        if ex.reasoning:
            assert msg["reasoning_content"] == ex.reasoning
    add = next(ex for ex in exs if ex.kind == "add")
    assert score(add, f"It is {add.answer + 1}.", []) == 0.0
    tool = next(ex for ex in exs if ex.kind == "tool")
    wrong = dict(tool.tool_call, arguments={**tool.tool_call["arguments"], "city": "Atlantis"})
    assert score(tool, "", [wrong]) == (0.0 if "city" in tool.tool_call["arguments"] else 1.0)
    js = next(ex for ex in exs if ex.kind == "json")
    assert score(js, "{not json", []) == 0.0
    result = next(ex for ex in exs if ex.kind == "tool_result")  # the sentence's own punctuation is no fact
    assert score(result, result.answer.rstrip("."), []) == score(result, result.answer[:-1] + "!", []) == 1.0
    assert reward(result, result.answer.rstrip("."), []) == 1.0
    echo = next(ex for ex in exs if ex.kind == "echo" and " " in ex.answer)
    assert score(echo, echo.answer.rsplit(" ", 1)[0], []) == 0.0
    assert reward(echo, echo.answer.rsplit(" ", 1)[0], []) == pytest.approx(0.9 * (len(echo.answer.split()) - 1)
                                                                            / len(echo.answer.split()))


def test_heldout_split_is_disjoint_from_training():
    train = generate(400, seed=0)
    held = generate(400, seed=0, split="heldout")
    cities = lambda exs: {ex.tool_call["arguments"]["city"] for ex in exs  # noqa: E731
                          if ex.tool_call and "city" in ex.tool_call["arguments"]}
    assert cities(train) and cities(held) and not cities(train) & cities(held)
    pairs = lambda exs: {ex.body["messages"][0]["content"] for ex in exs if ex.kind == "add"}  # noqa: E731
    sums = lambda exs: {tuple(map(int, __import__("re").findall(r"\d+", q)[:2])) for q in pairs(exs)}  # noqa: E731
    assert not sums(train) & sums(held)
    assert not {tuple(sorted(p)) for p in sums(train)} & {tuple(sorted(p)) for p in sums(held)}  # nor b + a
    # currency conversions: no held-out argument set is a training one (178 of 1252 were)
    money = lambda split: {tuple(sorted(ex.tool_call["arguments"].items())) for ex in  # noqa: E731
                           generate(1500, 0, split, {"tool": 1}) if ex.kind == "tool"
                           and ex.tool_call["name"] == "convert_currency"}
    assert money("train") and money("heldout") and not money("train") & money("heldout")
    # chat and code have no entities: half or more of their held-out prompts use wordings training never shows
    asks = lambda exs, kind: {ex.body["messages"][0]["content"] for ex in exs if ex.kind == kind}  # noqa: E731
    for kind in ("chat", "code"):
        unseen = asks(held, kind) - asks(train, kind)
        assert unseen and len(unseen) < len(asks(held, kind))


def test_packing_keeps_every_example_whole(dev):
    _, renderer = dev
    exs = generate(30, seed=3)
    tokens, mask, dropped = build_sft_corpus(exs, renderer, seq_len=1023, pad=1)
    assert dropped == 0 and len(tokens) % 1024 == 0 and len(mask) == len(tokens)
    rows = tokens.reshape(-1, 1024)
    assert len(rows) < len(exs)  # several examples share a row
    stream = " ".join(map(str, tokens.tolist()))
    for ex in exs:
        ids, m = renderer.example_ids(ex)
        assert " ".join(map(str, ids)) in stream
    assert int(mask.sum()) == sum(sum(renderer.example_ids(ex)[1]) for ex in exs)


def test_masked_loss_is_the_mean_over_assistant_targets():
    model = random_model(dsv4.Config.tiny(num_nextn_predict_layers=0)).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 512, (2 * 17,), generator=g).numpy().astype(np.int32)
    mask = (torch.rand(2 * 17, generator=g) < 0.4).numpy().astype(np.uint8)
    tr = Trainer(model, tokens, TrainConfig(batch_size=2, seq_len=16, seq_balance_coef=0.0, indexer_loss_weight=0.0),
                 mask=mask)
    ids, w = tr.batch()
    total, stats = tr.loss(ids, w)
    logits = model(ids[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1), reduction="none").view(2, 16)
    sel = torch.from_numpy(mask.reshape(2, 17)[:, 1:].astype(bool))
    assert torch.isclose(total, ce[sel].mean(), atol=1e-6)


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    adv = group_advantages(r)
    assert torch.allclose(adv[:4], want) and torch.equal(adv[4:], torch.zeros(4))


def test_reverse_kl_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ps, pt = s.softmax(-1), t.softmax(-1)
    kl = [float((ps[i, j] * (ps[i, j] / pt[i, j]).log()).sum()) for i, j in [(0, 0), (0, 1), (1, 0)]]
    assert math.isclose(float(reverse_kl(s, t, mask)), sum(kl) / 3, rel_tol=1e-5)
    assert float(reverse_kl(s, s, mask)) == pytest.approx(0.0, abs=1e-6)


def test_reply_logits_are_the_full_forward_at_reply_positions():
    model = random_model(dsv4.Config.tiny(num_nextn_predict_layers=0))
    pairs = [([0, 5, 9, 7], [3, 4]), ([0, 8], [6, 2, 1])]
    with torch.no_grad():
        logits, tgt, mask = reply_logits(model, pairs)
        for i, (p, r) in enumerate(pairs):
            full = model(torch.tensor([p + r]))[0]
            for k in range(len(r)):
                assert torch.allclose(logits[i, k], full[len(p) - 1 + k], atol=1e-5)
                assert tgt[i, k] == r[k]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_grpo_update_raises_rewarded_replies_and_lowers_the_rest():
    """One policy-gradient update with advantages +1 / -1 on two fixed replies moves their log-probs apart."""
    model = random_model(dsv4.Config.tiny(num_nextn_predict_layers=0)).train()
    algo = GRPO(model, None, RLConfig(lr_muon=0.02, lr_adamw=1e-3))
    pairs = [([0, 5, 9], [3, 4, 1]), ([0, 5, 9], [7, 7, 1])]
    adv = torch.tensor([1.0, -1.0])

    def logp():
        logits, tgt, mask = reply_logits(model, pairs)
        lp = -F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        return (lp * mask).sum(1) / mask.sum(1)

    before = logp().detach()
    algo.update(-(adv * logp()).sum() / 2)
    after = logp().detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_rl_config_runs_grpo_and_reports_heldout_accuracy(dev, tmp_path, capsys):
    from dsv4.cli import main

    path, _ = dev
    cfg = tmp_path / "grpo.toml"
    cfg.write_text(f"""
[model]
init = "{path}"
[rl]
method = "grpo"
eval_examples = 3
eval_mix = {{add = 1, chat = 1}}
[train]
out = "{tmp_path / 'run'}"
steps = 2
prompts_per_step = 2
group_size = 2
max_tokens = 6
mix = {{add = 1}}
""")
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # trained on mix (add), evaluated on eval_mix (add and chat: 1 + 2 of the 3 held-out examples)
    assert rows[0]["step"] == 0 and set(rows[0]["heldout"]) == {"add", "chat", "all", "reward"}
    assert rows[-1]["step"] == 2 and "heldout" in rows[-1] and "reward" in rows[-1]
    assert dsv4.load_model(tmp_path / "run" / "model").config.vocab_size == dsv4.load_model(path).config.vocab_size
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace('method = "grpo"', 'method = "ppo"'))
    assert main(["train", str(bad)]) == 2
    assert "[rl] method" in capsys.readouterr().err
    # a distillation teacher with another tokenizer (here two ids swapped) would be compared id by id
    teacher = tmp_path / "teacher"
    shutil.copytree(path, teacher)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    # wrong values, unknown fields and missing directories name themselves before the held-out evaluation starts
    for old, new, named in (("max_tokens = 6", "max_tokens = 0", "max_tokens"),
                            ("group_size = 2", "group_size = 2\ntemperature = -1", "temperature"),
                            ("group_size = 2", "group_size = 2\ntemperature = 0", "[train] temperature"),
                            ("group_size = 2", "group_size = 1", "[train] group_size"),
                            ('method = "grpo"', f'method = "grpo"\nteacher = "{path}"', "[rl] teacher"),
                            ("mix = {add = 1}", "mix = {sum = 1}", "[train] mix"),
                            ("eval_mix = {add = 1, chat = 1}", "eval_mix = {add = 0}", "[rl] eval_mix"),
                            ("eval_examples = 3", 'eval_examples = "3"', "eval_examples"),
                            ("eval_examples = 3", "eval_examples = 3\nbogus = 1", "[rl]: unknown field bogus"),
                            ("[model]", "[modle]", "[modle]"),
                            (f'init = "{path}"', f'init = "{tmp_path / "nope"}"', "[model] init"),
                            ('method = "grpo"', f'method = "distill"\nteacher = "{teacher}"', "another tokenizer")):
        bad.write_text(cfg.read_text().replace(old, new))
        assert main(["train", str(bad)]) == 2, new
        err = capsys.readouterr().err
        assert named in err and "held-out accuracy before" not in err
    assert main(["train", str(cfg)]) == 2  # a fresh run would overwrite the run's checkpoint
    assert "already holds a training checkpoint" in capsys.readouterr().err


def rl_config(init, method: str) -> str:
    """A small [rl] config from the model at init (out = "OUT" to fill in): 4 steps of 2 prompts, checkpoints and
    held-out evaluations every 2 steps."""
    return f"""
[model]
init = "{init}"
[rl]
method = "{method}"
eval_examples = 2
eval_every = 2
{f'teacher = "{init}"' if method == "distill" else ""}
[train]
out = "OUT"
steps = 4
checkpoint_every = 2
prompts_per_step = 2
group_size = 2
max_tokens = 6
lr_adamw = 0.01
mix = {{add = 1}}
"""


@pytest.mark.parametrize("method", ["grpo", "distill"])
def test_rl_kill_and_resume_is_exact(dev, tmp_path, method):
    """An [rl] run stopped after a checkpoint and resumed writes the same metrics rows (losses, rewards,
    held-out scores) and the same final weights as an uninterrupted run."""
    from safetensors.torch import load_file

    from dsv4.cli import main

    text = rl_config(dev[0], method)
    runs = {}
    for name, stops in (("whole", [[]]), ("parts", [["--stop-after", "3"], ["--resume"]])):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text.replace("OUT", str(tmp_path / name)))
        for flags in stops:
            assert main(["train", str(cfg), *flags]) == 0
        runs[name] = ((tmp_path / name / "metrics.jsonl").read_text(),
                      load_file(str(tmp_path / name / "model" / "model.safetensors")))
    (rows, weights), (rows2, weights2) = runs["whole"], runs["parts"]
    assert rows == rows2 and len(rows.splitlines()) == 5  # the before row and 4 steps (step 3 redone after resume)
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_rl_resume_refuses_changed_settings_and_extends_steps_as_a_longer_run(dev, tmp_path, capsys):
    """--resume with an edited [train] or [rl] value is an error naming each, old and new value (it used to
    continue with the checkpoint's learning rates and the config's record of others). steps may grow: a finished
    2-step run resumed with steps = 4 writes the rows and weights of a 4-step run."""
    from safetensors.torch import load_file

    from dsv4.cli import main

    text = rl_config(dev[0], "grpo")
    straight = tmp_path / "straight.toml"
    straight.write_text(text.replace("OUT", str(tmp_path / "straight")))
    assert main(["train", str(straight)]) == 0
    cfg = tmp_path / "grown.toml"
    grown = text.replace("OUT", str(tmp_path / "grown"))
    cfg.write_text(grown.replace("steps = 4", "steps = 2"))
    assert main(["train", str(cfg)]) == 0
    assert_resume_refused(cfg, grown, (("lr_adamw = 0.01", "lr_adamw = 0.001\nlr_muon = 0.01",
                                        ["[train] lr_adamw 0.01 (checkpoint) vs 0.001 (now)",
                                         "[train] lr_muon 0.002 (checkpoint) vs 0.01 (now)"]),
                                       ("eval_examples = 2", "eval_examples = 3",
                                        ["[rl] eval_examples 2 (checkpoint) vs 3 (now)"]),
                                       ("max_tokens = 6", "max_tokens = 6\ntemperature = 0.7",
                                        ["[train] temperature 1.0 (checkpoint) vs 0.7 (now)"])), capsys)
    cfg.write_text(grown)  # steps 2 -> 4
    assert main(["train", str(cfg), "--resume"]) == 0
    assert (tmp_path / "grown" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    w, w2 = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("straight", "grown"))
    assert all(torch.equal(w[k], w2[k]) for k in w)
    cfg.write_text(grown.replace("steps = 4", "steps = 3"))  # fewer steps than the checkpoint's 4
    assert main(["train", str(cfg), "--resume"]) == 2 and "[train] steps 4 (checkpoint) vs 3" in capsys.readouterr().err


def test_partial_credit_reward_hand_computed():
    from dsv4.train.tasks import Example, reward

    js = Example("json", {}, content='{"name": "Ann", "age": 30}', answer={"name": "Ann", "age": 30})
    assert reward(js, '{"name": "Ann", "age": 30}', []) == 1.0
    assert reward(js, '{"name": "Bo", "age": 30}', []) == pytest.approx(0.9 * 1 / 2)
    assert reward(js, '{"name": "Ann", "age": 30, "x": 1}', []) == pytest.approx(0.9 * 1.5 / 2)
    assert reward(js, "[1]", []) == 0.0 and reward(js, "nope", []) == 0.0
    want = {"name": "convert_currency", "arguments": {"amount": 5, "source": "EUR", "target": "USD"}}
    tool = Example("tool", {}, answer=want)
    assert reward(tool, "", [want]) == 1.0
    assert reward(tool, "", [{"name": "convert_currency", "arguments": {"amount": 5, "source": "GBP"}}]) == \
        pytest.approx(0.5 + 0.4 / 3)
    assert reward(tool, "", [{"name": "get_time", "arguments": {}}]) == 0.0
    code = Example("code", {}, content="```python\ndef add(a, b):\n    return a + b\n```", answer="a + b")
    assert reward(code, code.content, []) == 1.0
    assert reward(code, "```python\ndef add(a, b):\n    return a * b\n```", []) == pytest.approx(0.45)
    assert reward(code, "```python\ndef maximum(x, y):\n    return a + b\n```", []) == pytest.approx(0.45)
    assert reward(code, "def", []) == 0.0
    add = Example("add", {}, answer=57)
    assert reward(add, "= 57.", []) == 1.0 and reward(add, "= 47.", []) == 0.25 and reward(add, "= 56", []) == 0.0


def test_group_advantages_are_zero_not_nan_for_single_reply_and_unanimous_groups():
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2))
    assert torch.equal(group_advantages(torch.tensor([[0.5, 0.5, 0.5]])), torch.zeros(3))


def test_grpo_needs_sampled_groups_of_two_and_distillation_takes_any_group_size():
    """GRPO compares the replies to a prompt: group_size 1 or temperature 0 (greedy: one reply repeated, every
    advantage 0) is refused by name; distillation draws one reply per prompt and never reads group_size."""
    from dsv4.train.rl import Distill

    model = random_model(dsv4.Config.tiny(num_nextn_predict_layers=0))
    with pytest.raises(dsv4.ConfigError, match=r"\[train\] group_size: must be an integer >= 2 for GRPO"):
        GRPO(model, None, RLConfig(group_size=1))
    with pytest.raises(dsv4.ConfigError, match=r"\[train\] temperature: must be a number >= 1e-05 for GRPO"):
        GRPO(model, None, RLConfig(temperature=0.0))
    assert GRPO(model, None, RLConfig(group_size=2, temperature=0.6)).cfg.group_size == 2
    assert Distill(model, random_model(dsv4.Config.tiny(num_nextn_predict_layers=0)), None,
                   RLConfig(group_size=1, temperature=0.0)).cfg.group_size == 1
    with pytest.raises(dsv4.ConfigError, match="group_size"):
        RLConfig(group_size=0)


def test_grpo_loss_uses_the_log_probs_of_the_temperature_it_sampled_at(monkeypatch):
    """The replies are drawn from pi_T = softmax(logits / T), so the on-policy gradient is A * grad log pi_T(y):
    the loss is -1/N sum_i A_i mean_t log softmax(z_t / T)[y_t], from a full forward of prompt + reply. (At T = 1
    instead the group baseline no longer cancels after the first token and the update favours each context's
    argmax, even against the reward.)"""
    import dsv4.train.rl as rl

    T = 0.6
    model = random_model(dsv4.Config.tiny(num_nextn_predict_layers=0)).train()
    algo = GRPO(model, None, RLConfig(prompts_per_step=1, group_size=2, temperature=T, mix={"add": 1}))
    prompt, replies = [0, 5, 9], [[3, 4, 1], [7, 7]]
    monkeypatch.setattr(rl, "rollout", lambda model, renderer, examples, params, n: [
        (examples[0], prompt, r, {"content": str(i), "tool_calls": []}) for i, r in enumerate(replies)])
    monkeypatch.setattr(rl, "reward", lambda ex, content, calls: float(content))  # rewards 0 and 1
    losses = []
    monkeypatch.setattr(GRPO, "update", lambda self, loss: losses.append(loss.item()) or 0.0)
    algo.step()
    adv = torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-4)  # (r - mean) / (unbiased std + eps)

    def loss_at(temp):
        with torch.no_grad():
            lp = [torch.log_softmax(model(torch.tensor([prompt + r]))[0, len(prompt) - 1:-1] / temp, -1)
                  [torch.arange(len(r)), torch.tensor(r)].mean() for r in replies]
        return float(-(adv * torch.stack(lp)).sum() / 2)

    assert losses == [pytest.approx(loss_at(T), rel=1e-5)]
    assert abs(loss_at(T) - loss_at(1.0)) > 0.01  # the temperature matters here


def test_score_refuses_extra_tool_calls_and_echo_credit_counts_padding():
    """An `add` reply with the right sum that also calls a tool does not solve it (score 0); a `tool` task answered
    with two calls, even two right ones, scores 0 and earns no partial credit; an echo reply padded with extra
    words earns 0.9 x matching words / the longer of the two lengths, less than the exact reply."""
    from dsv4.train.tasks import Example

    add = Example("add", {}, content="20 + 37 = 57.", answer=57)
    call = {"name": "get_time", "arguments": {"city": "Paris"}}
    assert score(add, "20 + 37 = 57.", []) == 1.0
    assert score(add, "20 + 37 = 57.", [call]) == 0.0
    assert reward(add, "20 + 37 = 57.", [call]) < 1.0
    want = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    tool = Example("tool", {}, tool_call=want, answer=want)
    assert score(tool, "", [want]) == 1.0
    assert score(tool, "", [want, want]) == 0.0 and reward(tool, "", [want, want]) == 0.0
    assert score(tool, "", [want, call]) == 0.0 and reward(tool, "", [want, call]) == 0.0
    echo = Example("echo", {}, content="Oslo 42 Alice", answer="Oslo 42 Alice")
    assert reward(echo, "Oslo 42 Alice", []) == 1.0
    # 3 words match of the 5 said: 0.9 * 3 / 5 = 0.54 (not 0.9 * 3 / 3: padding is not free)
    assert score(echo, "Oslo 42 Alice and more", []) == 0.0
    assert reward(echo, "Oslo 42 Alice and more", []) == pytest.approx(0.54)
    # a shorter reply is counted against the answer's 3 words: 0.9 * 2 / 3 = 0.6
    assert reward(echo, "Oslo 42", []) == pytest.approx(0.6)


def test_heldout_tasks_name_only_real_heldout_cities_and_people():
    """Invented names (capitalised syllables) are a training device; the held-out split draws every city and
    name from the module's lists, and only the held-out fifth of them (_held)."""
    from dsv4.train.tasks import CITIES, NAMES, _held

    held_cities = {c for c in CITIES if _held(c)}
    held_names = {n for n in NAMES if _held(n)}
    assert held_cities and held_names
    exs = generate(300, seed=1, split="heldout", mix={"tool": 1, "json": 1})
    cities = {ex.tool_call["arguments"]["city"] for ex in exs
              if ex.kind == "tool" and "city" in ex.tool_call["arguments"]}
    cities |= {ex.answer["city"] for ex in exs if ex.kind == "json" and "city" in ex.answer}
    names = {ex.answer["name"] for ex in exs if ex.kind == "json"}
    assert cities and names
    assert cities <= held_cities, cities - held_cities
    assert names <= held_names, names - held_names
    # echo phrases: each word a held-out city or name, a number, a currency code or a job
    others = {"USD", "EUR", "GBP", "JPY", "CNY", "CHF", "teacher", "engineer", "doctor", "pilot", "chef", "writer",
              "farmer", "nurse"}
    words = {w for ex in generate(200, seed=2, split="heldout", mix={"echo": 1}) for w in ex.answer.split()}
    assert {w for w in words if not w.isdigit()} <= held_cities | held_names | others
    # training does use invented ones (copying from the request, not recall)
    train = generate(200, seed=1, split="train", mix={"json": 1})
    assert {ex.answer["name"] for ex in train} - set(NAMES)
