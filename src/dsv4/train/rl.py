"""Post-training on generated tasks with verifiable answers (dsv4.train.tasks):

- `evaluate`: greedy replies through the engine and the server's output parser, scored per task kind;
- `GRPO`: group-relative policy optimisation. Per prompt, sample a group of replies, reward each in
  [0, 1] by its verifier with partial credit (tasks.reward), advantage A_i = (r_i - mean) / (std + eps)
  within the group, and minimise -mean_i A_i * mean_t log pi_T(y_it) (one on-policy update per batch, so
  the PPO ratio is 1), pi_T = softmax(logits / temperature): the policy the replies were sampled from;
- `Distill`: on-policy distillation. The student samples replies; the loss is the per-token reverse KL
  sum_v p_s(v) (log p_s(v) - log p_t(v)) to a teacher evaluated on the same tokens.

Both use Muon + AdamW (`muon.optimizers`) like pretraining, and checkpoint and resume exactly as it does
(`trainer.Checkpointed`: the task stream's RNG is part of the state).
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import check_fields, is_int, is_number
from ..engine.engine import LLMEngine, EngineConfig
from ..engine.sampling import GREEDY_BELOW, SamplingParams
from .muon import optimizers
from .sft import ChatRenderer
from .tasks import check_mix, generate, reward, score
from .trainer import Checkpointed


@dataclass
class RLConfig:
    steps: int = 60
    prompts_per_step: int = 4
    group_size: int = 8  # GRPO: replies per prompt, >= 2 to compare (distillation: unused, 1 reply per prompt)
    max_tokens: int = 96
    temperature: float = 1.0  # the rollouts' sampling temperature (GRPO: > 0; distillation: 0 is greedy)
    lr_muon: float = 0.002
    lr_adamw: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # the gradient norm's cap; 0: no clipping
    seed: int = 0
    mix: dict = field(default_factory=lambda: {"add": 1})

    def __post_init__(self):
        """Every field checked here, so a bad value names itself rather than failing mid-run."""
        v = vars(self)
        check_fields("[train]", [(n, v[n], is_int(v[n], least), f"an integer >= {least}")
                                 for n, least in (("steps", 1), ("prompts_per_step", 1), ("group_size", 1),
                                                  ("max_tokens", 1), ("seed", 0))]
                     + [(n, v[n], is_number(v[n]), "a number >= 0")
                        for n in ("lr_muon", "lr_adamw", "weight_decay", "grad_clip")]
                     + [("temperature", self.temperature, is_number(self.temperature, 0, 100), "in [0, 100]")])
        check_mix(self.mix, "[train] mix")


def check_grpo(cfg: RLConfig) -> None:
    """What GRPO needs of an RLConfig beyond its own checks: a group of replies to compare, sampled rather
    than greedy (a greedy group is one reply repeated: every advantage 0, nothing learnt)."""
    check_fields("[train]", [
        ("group_size", cfg.group_size, cfg.group_size >= 2, "an integer >= 2 for GRPO (it compares the replies "
                                                            "to one prompt)"),
        ("temperature", cfg.temperature, cfg.temperature >= GREEDY_BELOW,
         f"a number >= {GREEDY_BELOW} for GRPO (lower samples greedily: every reply in a group the same, every "
         "advantage 0)")])


def rollout(model, renderer: ChatRenderer, examples: list, params: SamplingParams, n: int = 1,
            constraint=None) -> list:
    """Generate n replies per example. Returns [(example, prompt_ids, reply_ids, parsed message)].

    reply_ids include the closing EOS when the model stopped."""
    engine = LLMEngine(model, renderer.tokenizer, EngineConfig(prefix_block=0, max_num_seqs=64))
    eos = model.config.eos_token_id
    jobs = []
    for ex in examples:
        prompt = renderer.prompt_ids(ex.body)
        for i in range(n):
            p = params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            jobs.append((ex, prompt, engine.add_request(prompt, p, constraint=constraint() if constraint else None)))
    while engine.has_unfinished():
        engine.step()
    out = []
    for ex, prompt, seq in jobs:
        ids = list(seq.output_ids)
        stopped = bool(ids) and ids[-1] == eos
        msg = renderer.parse(renderer.conversation(ex.body), ids[:-1] if stopped else ids, stopped)
        out.append((ex, prompt, ids, msg))
    model.train()
    return out


def evaluate(model, renderer: ChatRenderer, examples: list, max_tokens: int = 96) -> dict:
    """Greedy accuracy per task kind (and "all") on `examples`, and the mean partial-credit reward."""
    results = rollout(model, renderer, examples, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    by = defaultdict(list)
    for ex, _, _, msg in results:
        s = score(ex, msg["content"], msg["tool_calls"])
        by[ex.kind].append(s)
        by["all"].append(s)
        by["reward"].append(reward(ex, msg["content"], msg["tool_calls"]))
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def reply_logits(model, pairs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions predicting each reply token.

    pairs: [(prompt_ids, reply_ids)]. Returns (logits [N, T, V], targets [N, T], mask [N, T]) with T the
    longest reply; right padding never influences earlier positions (causal)."""
    L = max(len(p) + len(r) for p, r in pairs)
    T = max(len(r) for _, r in pairs)
    ids = torch.full((len(pairs), L), model.config.eos_token_id, dtype=torch.long)
    pos = torch.zeros(len(pairs), T, dtype=torch.long)
    tgt = torch.zeros(len(pairs), T, dtype=torch.long)
    mask = torch.zeros(len(pairs), T)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        pos[i, :len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        tgt[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1.0
    logits = model(ids)
    logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    return logits, tgt, mask


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: rewards [P, G] (G replies per prompt) -> (r - mean) / (std + eps) per group, [P*G].

    A group with equal rewards (one reply included, whose std is undefined) gets zero advantage: nothing to
    compare, where a NaN would destroy the weights."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if rewards.shape[1] < 2:
        return torch.zeros_like(centred).reshape(-1)
    return (centred / (rewards.std(1, keepdim=True) + eps)).reshape(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over mask of KL(p_s || p_t) = sum_v p_s (log p_s - log p_t); logits [N, T, V], mask [N, T]."""
    s, t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    kl = (s.exp() * (s - t)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


class _Optimised(Checkpointed):
    def __init__(self, model, cfg: RLConfig):
        self.model, self.cfg = model.train(), cfg
        self.device, self.parallel = next(model.parameters()).device, None
        self.opts = optimizers(model, cfg.lr_muon, cfg.lr_adamw, cfg.weight_decay)
        self.rng = random.Random(cfg.seed)  # the task draws and the rollouts' sampling seeds
        self.step_count = 0

    def _progress(self) -> dict:
        return {"rng_tasks": self.rng.getstate()}

    def _set_progress(self, meta: dict) -> None:
        version, state, gauss = meta["rng_tasks"]
        self.rng.setstate((version, tuple(state), gauss))

    def prompts(self, n: int) -> list:
        draws = generate(n, self.rng.randrange(1 << 30), "train", self.cfg.mix)
        return [ex for ex in draws if ex.kind in self.cfg.mix
                or (ex.kind == "tool_result" and "tool" in self.cfg.mix)][:n]

    def update(self, loss: torch.Tensor) -> float:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        for opt in self.opts:
            opt.step()
        self.step_count += 1
        return float(norm)


class GRPO(_Optimised):
    def __init__(self, model, renderer: ChatRenderer, cfg: RLConfig):
        check_grpo(cfg)
        super().__init__(model, cfg)
        self.renderer = renderer

    def step(self) -> dict:
        cfg = self.cfg
        examples = self.prompts(cfg.prompts_per_step)
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                seed=self.rng.randrange(1 << 30))
        results = rollout(self.model, self.renderer, examples, params, cfg.group_size)
        rewards = torch.tensor([reward(ex, m["content"], m["tool_calls"]) for ex, _, _, m in results])
        adv = group_advantages(rewards.view(len(examples), cfg.group_size))
        stats = {"step": self.step_count + 1, "reward": rewards.mean().item(),
                 "reply_tokens": sum(len(r) for _, _, r, _ in results) / len(results)}
        keep = [i for i in range(len(results)) if adv[i] != 0 and results[i][2]]
        if not keep:  # every group unanimous: nothing to learn from this batch
            self.step_count += 1
            return {**stats, "loss": 0.0, "grad_norm": 0.0}
        logits, tgt, mask = reply_logits(self.model, [(results[i][1], results[i][2]) for i in keep])
        # log pi_T: the engine drew each token from softmax(logits / T); at T = 1 instead, the group's baseline
        # no longer cancels after the first token and the update drifts toward each context's argmax
        logp = -F.cross_entropy((logits / cfg.temperature).transpose(1, 2), tgt, reduction="none")  # [N, T]
        per_seq = (logp * mask).sum(1) / mask.sum(1)
        loss = -(adv[keep] * per_seq).sum() / len(results)
        stats["grad_norm"] = self.update(loss)
        stats["loss"] = loss.item()
        return stats


class Distill(_Optimised):
    def __init__(self, student, teacher, renderer: ChatRenderer, cfg: RLConfig):
        super().__init__(student, cfg)
        self.teacher, self.renderer = teacher.eval(), renderer
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def step(self) -> dict:
        cfg = self.cfg
        examples = self.prompts(cfg.prompts_per_step)
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                seed=self.rng.randrange(1 << 30))
        results = [r for r in rollout(self.model, self.renderer, examples, params) if r[2]]
        pairs = [(p, r) for _, p, r, _ in results]
        with torch.no_grad():
            t_logits, _, _ = reply_logits(self.teacher, pairs)
        s_logits, _, mask = reply_logits(self.model, pairs)
        loss = reverse_kl(s_logits, t_logits, mask)
        rewards = [reward(ex, m["content"], m["tool_calls"]) for ex, _, _, m in results]
        return {"step": self.step_count + 1, "loss": loss.item(), "grad_norm": self.update(loss),
                "reward": sum(rewards) / max(1, len(rewards))}


def heldout(n: int, mix: dict, seed: int = 1234) -> list:
    """n held-out examples of the kinds in mix (disjoint entities and number pairs from training)."""
    return [ex for ex in generate(n, seed, "heldout", mix)
            if ex.kind in mix or (ex.kind == "tool_result" and "tool" in mix)][:n]


