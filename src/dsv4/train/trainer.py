"""A training loop for DeepSeek-V4: next-token + MTP loss, Muon + AdamW, warmup-stable-decay,
gradient clipping, auxiliary-loss-free expert balancing, atomic checkpoints and exact resume.

Data is a flat token array read in order (position saved in checkpoints), so a resumed run sees
exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, replacing_dir
from ..config import check_fields, is_int, is_number
from ..model.attention import Attention
from ..model.moe import MoE
from ..model.transformer import Transformer
from .muon import optimizers


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    lr_muon: float = 0.02
    lr_adamw: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 10
    decay_frac: float = 0.2  # the last fraction of steps decays the learning rate linearly to 10%
    grad_clip: float = 1.0  # the gradient norm's cap; 0: no clipping
    mtp_weight: float = 0.3  # falls to mtp_weight_decay once the learning rate decays
    mtp_weight_decay: float = 0.1
    bias_update_speed: float = 0.001  # auxiliary-loss-free balancing
    seq_balance_coef: float = 1e-4  # small sequence-wise balance loss on the top-k layers
    indexer_loss_weight: float = 1.0  # the Lightning Indexer's KL loss (it trains only the indexer); 0: frozen
    seed: int = 0
    compile: bool = False  # torch.compile the forward and losses (minutes to compile, then faster steps)
    device: str = "auto"  # `dsv4 train`'s device: "auto" (cuda when present, this rank's GPU under torchrun), "cpu", "cuda:N"
    bf16: bool = True  # bf16 autocast for forward and losses on GPU (weights and optimiser state stay fp32)

    def __post_init__(self):
        """Every field checked here, so a bad value names itself rather than failing mid-run."""
        v = vars(self)
        check_fields("[train]", [(n, v[n], is_int(v[n], least), f"an integer >= {least}")
                                 for n, least in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("warmup", 0))]
                     + [("seed", self.seed, is_int(self.seed, 0) and self.seed < 2 ** 32, "an integer in [0, 2**32)")]
                     + [(n, v[n], is_number(v[n]), "a number >= 0")
                        for n in ("lr_muon", "lr_adamw", "weight_decay", "grad_clip", "mtp_weight", "mtp_weight_decay",
                                  "bias_update_speed", "seq_balance_coef", "indexer_loss_weight")]
                     + [("decay_frac", self.decay_frac, is_number(self.decay_frac, 0, 1), "a number in [0, 1]"),
                        ("compile", self.compile, isinstance(self.compile, bool), "true or false"),
                        ("bf16", self.bf16, isinstance(self.bf16, bool), "true or false"),
                        ("device", self.device, isinstance(self.device, str), "a string: auto, cpu or cuda:N")])

    def decay_start(self) -> int:
        """Where the decay's line starts (at 1): the last ceil(steps x decay_frac) steps are the decay window, in
        exact arithmetic with decay_frac as written (0.3 is 3/10: 90 x 0.3 is 27, where float rounding made 90 x
        0.7 = 62.99... and a window of 28), and a line needs two steps: a one-step window starts it a step earlier."""
        n = math.ceil(Fraction(str(self.decay_frac)) * self.steps)
        return self.steps - max(n, 2) if n else self.steps

    def lr_factor(self, step: int) -> float:
        """Warmup-stable-decay multiplier for step (0-based): linear warmup, 1, then linearly from 1 at
        `decay_start` down to 0.1 at the last step."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        start = self.decay_start()
        if step < start:
            return 1.0
        return 1.0 - 0.9 * (step - start) / (self.steps - 1 - start)


class Checkpointed:
    """Atomic checkpoints and exact resume for a training loop with `model`, `opts` (its optimisers), `cfg`
    (a dataclass), `step_count`, `parallel` (None or a plan as Trainer takes) and `device`: weights,
    optimiser state, step, the torch / Python / NumPy RNG states and what `_progress` adds.

    A resume continues the run with its own settings: `cfg` and `settings` must equal the checkpoint's, but for
    how the run executes (cfg.device, cfg.compile) and cfg.steps while the steps taken keep their learning rate."""

    settings: dict = {}  # the run's settings outside cfg, e.g. {"[data] fim_rate": 0.5}: saved and checked on resume

    def _progress(self) -> dict:
        """Hook: further JSON state a resume needs (e.g. the data position)."""
        return {}

    def _set_progress(self, meta: dict) -> None:
        """Hook: restore what `_progress` saved."""

    def save(self, path) -> None:
        """Write atomically (`checkpoint.replacing_dir`): a kill at any point leaves `path` or `path`.old
        complete (resume falls back to the latter), plus leftovers that the next save removes.

        Under FSDP2 every rank calls it (sharded weights and optimiser state are gathered to full tensors)
        and rank 0 writes: the checkpoint is the same as a single process's and resumes under any plan."""
        model_sd, seen = {}, set()
        for k, v in self.model.state_dict().items():
            v = _full(v).detach().contiguous()
            model_sd[k] = v.clone() if v.data_ptr() in seen else v  # tied embeddings: safetensors wants two copies
            seen.add(v.data_ptr())
        opt_tensors, opt_meta = {}, []
        for i, opt in enumerate(self.opts):
            sd = opt.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        opt_tensors[f"{i}.{pid}.{k}"] = _full(v).contiguous()
                    else:
                        opt_meta.append([i, pid, k, v])
            opt_meta.append([i, "groups", sd["param_groups"]])
        if self.parallel is not None and self.parallel.rank != 0:
            return
        with replacing_dir(Path(path)) as tmp:
            save_file(model_sd, str(tmp / "model.safetensors"))
            opt_tensors["rng.torch"] = torch.get_rng_state()
            if self.device.type == "cuda":
                opt_tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            np_state = np.random.get_state()
            meta = {"step": self.step_count, **self._progress(), "config": asdict(self.cfg), "settings": self.settings,
                    "model": asdict(self.model.config), "optimizer": opt_meta, "rng_python": random.getstate(),
                    "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
            (tmp / "trainer.json").write_text(json.dumps(meta))

    def resume(self, path) -> None:
        """Continue from a checkpoint written by save(). If `path` is missing or damaged and `path`.old is intact
        (a kill between save()'s renames, a truncated file), that one is loaded instead, with a note on stderr.

        Raises CheckpointError naming the file and the problem (nothing is loaded then), also when the checkpoint
        was written for another model config."""
        path = Path(path)
        old = path.with_name(path.name + ".old")
        try:
            src, (model_sd, tensors, meta) = path, _read_checkpoint(path)
        except CheckpointError as e:
            if not old.is_dir():
                raise CheckpointError(f"{e}; restore {path}, or delete it to start the run afresh") from None
            try:
                src, (model_sd, tensors, meta) = old, _read_checkpoint(old)
            except CheckpointError as e_old:
                raise CheckpointError(f"{e}; the previous checkpoint is damaged too: {e_old}") from None
            # no `path` at all is a kill between save()'s renames: nothing to report
            if path.exists() and (self.parallel is None or self.parallel.rank == 0):
                print(f"dsv4 train: {e}; resuming from the previous checkpoint {old}", file=sys.stderr)
        self._check_matches(src, model_sd, meta)
        missing = sorted(set(self._progress()) - set(meta))
        if missing:
            raise CheckpointError(f"{src / 'trainer.json'}: no {missing} (written by another kind of training run)")
        current = self.model.state_dict()
        self.model.load_state_dict({k: _like(v, current[k]) for k, v in model_sd.items()})
        for i, opt in enumerate(self.opts):
            state: dict = {}
            groups = None
            for entry in meta["optimizer"]:
                if entry[0] != i:
                    continue
                if entry[1] == "groups":
                    groups = entry[2]
                else:
                    state.setdefault(int(entry[1]), {})[entry[2]] = entry[3]
            params = [p for g in opt.param_groups for p in g["params"]]  # state ids index this list
            for key, v in tensors.items():
                parts = key.split(".")
                if parts[0] == str(i):
                    p = params[int(parts[1])]
                    state.setdefault(int(parts[1]), {})[parts[2]] = _like(v, p) if v.shape == p.shape else v
            opt.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        random.setstate((meta["rng_python"][0], tuple(meta["rng_python"][1]), meta["rng_python"][2]))
        ns = meta["rng_numpy"]
        np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), *ns[2:]))
        self.step_count = meta["step"]
        self._set_progress(meta)

    def _check_matches(self, src: Path, model_sd: dict, meta: dict) -> None:
        """CheckpointError unless the checkpoint in src was written for this model and run: config, tensors,
        settings (`_check_settings`), optimiser."""
        if "model" in meta:  # checkpoints from before it was stored: the tensor checks below still catch most
            now = json.loads(json.dumps(asdict(self.model.config)))  # lists and floats as JSON gives them back
            diff = [f"{k} {meta['model'].get(k)!r} (checkpoint) vs {now.get(k)!r} (now)"
                    for k in sorted(set(now) | set(meta["model"])) if meta["model"].get(k) != now.get(k)]
            if diff:
                raise CheckpointError(f"{src / 'trainer.json'}: written for another model config: {'; '.join(diff)}. "
                                      f"Resume with the model config it was trained with, or start a new run "
                                      f"in another directory")
        current = self.model.state_dict()
        missing, extra = sorted(set(current) - set(model_sd)), sorted(set(model_sd) - set(current))
        wrong = [f"'{k}' {tuple(v.shape)} vs {tuple(current[k].shape)}" for k, v in model_sd.items()
                 if k in current and v.shape != current[k].shape]
        if missing or extra or wrong:
            raise CheckpointError(f"{src / 'model.safetensors'}: does not fit this model (missing {missing[:4]}, "
                                  f"unexpected {extra[:4]}, shapes checkpoint vs model {wrong[:4]}); resume with "
                                  f"the model config it was trained with")
        self._check_settings(src, meta)  # e.g. indexer_loss_weight 0 freezes parameters: named before the groups
        for i, opt in enumerate(self.opts):
            groups = [e[2] for e in meta["optimizer"] if e[0] == i and e[1] == "groups"]
            if not groups or [len(g["params"]) for g in groups[0]] != [len(g["params"]) for g in opt.param_groups]:
                raise CheckpointError(f"{src / 'trainer.json'}: optimizer {i}'s parameter groups do not match "
                                      f"this model's; resume with the model config it was trained with")

    def _check_settings(self, src: Path, meta: dict) -> None:
        """CheckpointError naming each setting that differs from the checkpoint's, with both values. Compared:
        the fields both sides know (a checkpoint from before a field existed is not refused for it)."""
        taken = meta["step"]
        was = {**{f"[train] {k}": v for k, v in meta.get("config", {}).items()}, **meta.get("settings", {})}
        now = json.loads(json.dumps({**{f"[train] {k}": v for k, v in asdict(self.cfg).items()}, **self.settings}))
        diff = []
        for k in sorted(set(was) & set(now)):
            if was[k] == now[k] or k in ("[train] device", "[train] compile"):  # how it runs, not what it computes
                continue
            why = ""
            if k == "[train] steps":
                if self._may_change_steps(was[k], taken):
                    continue
                why = (f" (steps may change only to a count >= the checkpoint's step {taken}, and while no step "
                       f"taken has decayed under either schedule: a longer run from its stable phase)")
            diff.append(f"{k} {was[k]!r} (checkpoint) vs {now[k]!r} (now){why}")
        if diff:
            raise CheckpointError(f"{src / 'trainer.json'}: written by a run with other settings: {'; '.join(diff)}. "
                                  f"--resume continues a run with its own settings: restore these values, or start a "
                                  f"new run in another directory")

    def _may_change_steps(self, old_steps, taken: int) -> bool:
        """Whether a run that took `taken` steps of `old_steps` may continue with cfg.steps: they still cover those
        steps, and with a learning-rate schedule each step taken had the factor the new schedule gives it (so the
        run is what a run of cfg.steps from the start would be)."""
        if not (is_int(old_steps, 1) and taken <= self.cfg.steps):
            return False
        if not hasattr(self.cfg, "lr_factor"):
            return True
        old = replace(self.cfg, steps=old_steps)
        same_until = min(old.decay_start(), self.cfg.decay_start())  # both are warmup, then 1, before it
        return all(old.lr_factor(i) == self.cfg.lr_factor(i) for i in range(max(0, same_until), taken))


class Trainer(Checkpointed):
    def __init__(self, model: Transformer, tokens: np.ndarray, cfg: TrainConfig, parallel=None,
                 mask: np.ndarray | None = None):
        """parallel: a plan such as distributed.DataParallel (shard, sync_gradients, mean, sum, rank, world).
        mask: optional 0/1 array like tokens; only targets with mask 1 count (SFT: assistant turns)."""
        self.model, self.cfg = model.train(), cfg
        self.device = next(model.parameters()).device
        self.parallel = parallel
        self.tokens, self.mask = tokens, mask
        if mask is not None and len(mask) != len(tokens):
            raise ValueError(f"mask has {len(mask)} entries for {len(tokens)} tokens")
        if not cfg.indexer_loss_weight:  # no loss trains the indexer: frozen, and its loss is not computed
            for m in model.modules():
                if isinstance(m, Attention) and m.indexer is not None:
                    m.indexer.requires_grad_(False)
        self.opts = optimizers(model, cfg.lr_muon, cfg.lr_adamw, cfg.weight_decay)
        self._compute = torch.compile(self._losses) if cfg.compile else self._losses
        self.base_lrs = [cfg.lr_muon, cfg.lr_adamw]
        self.step_count, self.position = 0, 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next [B, S+1] window of the token stream (wrapping around), and its mask if any."""
        n = self.cfg.batch_size * (self.cfg.seq_len + 1)
        idx = (self.position + np.arange(n)) % len(self.tokens)
        self.position = int((self.position + n) % len(self.tokens))
        ids = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64)).view(self.cfg.batch_size, -1)
        if self.mask is None:
            return ids.to(self.device), None
        mask = torch.from_numpy(np.asarray(self.mask[idx], dtype=np.float32)).view(self.cfg.batch_size, -1)
        return ids.to(self.device), mask.to(self.device)

    def _progress(self) -> dict:
        return {"position": self.position}

    def _set_progress(self, meta: dict) -> None:
        self.position = meta["position"]

    @staticmethod
    def _ce(logits: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor | None, n: torch.Tensor | None) -> torch.Tensor:
        """logits [B, S, V], tgt [B, S] -> cross-entropy: the mean over all targets when w is None, else the sum
        over the targets with weight w [B, S] divided by n (a scalar, see _divisors)."""
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        if w is None:
            return ce.mean()
        return (ce * w.reshape(-1)).sum() / n

    def _divisors(self, w: torch.Tensor) -> torch.Tensor:
        """w [B, S] target weights -> [2]: what this rank divides its masked next-token and MTP loss sums by.

        The target count of the whole global batch (all ranks) over the number of ranks: gradients are then
        averaged over ranks, so every target weighs 1 / (global count) as in one process on the global batch.
        A rank's own count would overweight the targets of ranks that hold few of them."""
        counts = torch.stack([w.sum(), w[:, 1:].sum()])
        world = 1
        if self.parallel is not None:
            counts, world = self.parallel.sum(counts), self.parallel.world
        return counts.clamp(min=1.0) / world

    def _losses(self, ids: torch.Tensor, w: torch.Tensor | None,
                n: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [B, S+1], w [B, S] target weights or None, n [2] their divisors (None with w) -> (next-token loss,
        MTP loss or None)."""
        inp, tgt = ids[:, :-1], ids[:, 1:]
        # one call of the model itself (so wrappers such as FSDP see a forward); MTP: stream t with token
        # t+1 predicts token t+2
        n_main, n_mtp = (None, None) if n is None else n
        if not len(self.model.mtp):
            return self._ce(self.model(inp), tgt, w, n_main), None
        logits, mtp = self.model(inp, tgt[:, :-1])
        return self._ce(logits, tgt, w, n_main), self._ce(mtp, tgt[:, 1:], None if w is None else w[:, 1:], n_mtp)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        w = None if mask is None else mask[:, 1:]
        n = None if w is None else self._divisors(w)  # collective under a parallel plan: every rank calls it
        scope = contextlib.nullcontext()
        if self.cfg.compile:  # the compiled graph skips the model's own input check; MoE counts stay symbolic
            from torch._dynamo import config as dynamo

            self.model._check_ids(ids)
            scope = dynamo.patch(capture_scalar_outputs=True)
        with scope, autocast(self.device, self.cfg.bf16):
            main, mtp_loss = self._compute(ids, w, n)
        stats = {"loss": main.item()}
        total = main
        if self.cfg.seq_balance_coef:
            bal = [m.balance_loss for m in self.model.modules() if isinstance(m, MoE) and m.balance_loss is not None]
            if bal:
                balance = torch.stack(bal).mean()
                total = total + self.cfg.seq_balance_coef * balance
                stats["balance_loss"] = balance.item()
        if self.cfg.indexer_loss_weight:
            kl = [a.indexer_loss for a in self.model.modules() if isinstance(a, Attention) and a.indexer_loss is not None]
            if kl:  # the indexer's inputs are detached: this trains the indexer and nothing else
                indexer = torch.stack(kl).mean()
                total = total + self.cfg.indexer_loss_weight * indexer
                stats["indexer_loss"] = indexer.item()
        if mtp_loss is not None:
            w = self.cfg.mtp_weight if self.cfg.lr_factor(self.step_count) >= 1.0 or self.step_count < self.cfg.warmup \
                else self.cfg.mtp_weight_decay
            total = total + w * mtp_loss
            stats["mtp_loss"] = mtp_loss.item()
        return total, stats

    def step(self) -> dict:
        ids, mask = self.batch()
        if self.parallel is not None:
            ids = self.parallel.shard(ids)
            mask = None if mask is None else self.parallel.shard(mask)
        factor = self.cfg.lr_factor(self.step_count)
        for opt, base in zip(self.opts, self.base_lrs):
            for g in opt.param_groups:
                g["lr"] = base * factor
        total, stats = self.loss(ids, mask)
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        total.backward()
        if self.parallel is not None:
            self.parallel.sync_gradients(self.model)
            stats = {k: self.parallel.mean(v) for k, v in stats.items()}
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        stats["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        for opt in self.opts:
            opt.step()
        loads = self._balance()
        if loads:  # per-expert token counts of each top-k layer, and the worst max/mean
            stats["expert_load"] = loads
            stats["load_max_over_mean"] = max(max(v) / max(1e-9, sum(v) / len(v)) for v in loads.values())
        self.step_count += 1
        stats["step"], stats["lr_factor"] = self.step_count, factor
        return stats

    @torch.no_grad()
    def _balance(self) -> dict:
        """Auxiliary-loss-free: raise the selection bias of under-loaded experts, lower over-loaded ones.
        Returns {module name: per-expert token counts} of this step."""
        loads = {}
        for name, m in self.model.named_modules():
            if isinstance(m, MoE) and not m.gate.hash and m.last_load is not None:
                load = m.last_load.float()
                if self.parallel is not None:
                    load = self.parallel.sum(load)
                m.gate.bias.add_(self.cfg.bias_update_speed * torch.sign(load.mean() - load))
                loads[name] = [int(x) for x in load.tolist()]
        return loads

def _read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """A checkpoint directory of save() -> (model tensors, optimiser and RNG tensors, trainer.json's metadata);
    CheckpointError naming the file that is missing or unreadable."""
    meta_file = path / "trainer.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing, so {path} is not a complete checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: not readable JSON ({e})") from None
    need = ("step", "optimizer", "rng_python", "rng_numpy")
    if not isinstance(meta, dict) or not all(k in meta for k in need):
        raise CheckpointError(f"{meta_file}: not a training checkpoint's metadata (needs {list(need)})")
    tensors = []
    for name in ("model.safetensors", "optimizer.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing, so {path} is not a complete checkpoint")
        try:
            tensors.append(load_file(str(path / name)))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path / name}: not a readable safetensors file ({e})") from None
    if "rng.torch" not in tensors[1]:
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: no 'rng.torch' tensor (not written by save())")
    return tensors[0], tensors[1], meta


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; collective: every rank calls it), else t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on a GPU when asked; a no-op on the CPU (fp32 training there)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """full laid out as ref: sharded the same way when ref is a DTensor (FSDP2), else as it is."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements)
    return full
