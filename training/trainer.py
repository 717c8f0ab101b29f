"""A model-agnostic trainer: AdamW + cosine decay, gradient clipping, atomic resumable checkpoints, TensorBoard,
a progress bar, and data-parallel training under ``torchrun`` (gradients averaged across processes with
``torch.distributed``: gloo on CPU, nccl on GPU).

The model-specific part is a ``loss_fn(model, batch) -> (loss_sum, count, metrics)``: the *sum* of the loss
over the batch's ``count`` targets. The trainer divides by the count summed over all ranks, so N processes on
N shards of a global batch take exactly the step one process takes on the whole batch (tested).

Data: a list of samples and a ``collate``; each step draws the next global batch of ``batch_size`` samples from
a seeded per-epoch permutation and rank ``r`` of ``N`` takes samples ``r, r + N, ...`` of it. With a ``group_fn``
every global batch holds samples of one group (the tokenized policy groups scenes by map: the map encoder then
runs on one map per step).

Checkpoints (rank 0): ``DIR/last.safetensors`` every ``ckpt_every`` steps and at the end — the model's tensors,
the optimizer's (prefixed ``optim.``), and in the metadata the model config, step and epoch (``save_fn`` gives
the agent name and config). ``resume=True`` continues from it. At the end, ``DIR/model.safetensors`` holds the
weights alone (what an agent loads; a third of the size).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from agents.checkpoint import load_checkpoint, save_checkpoint
from envs.errors import CheckpointError, TrafficGymError

CHECKPOINT = "last.safetensors"
WEIGHTS = "model.safetensors"  # the final weights alone (no optimizer state): the file to share or ship


@dataclass
class TrainConfig:
    out: str
    max_steps: int = 1000
    batch_size: int = 4  # samples (scenes) per global batch
    lr: float = 5e-4
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    final_lr_fraction: float = 0.01  # cosine decay to this fraction of lr
    log_every: int = 10
    ckpt_every: int = 200
    val_every: int = 0  # 0: only at the end (if a validate_fn is given)
    seed: int = 0
    resume: bool = False
    progress: bool = True


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, model: torch.nn.Module, loss_fn: Callable, samples: list, collate: Callable, cfg: TrainConfig,
                 save_fn: Callable[[torch.nn.Module], tuple[str, dict]],
                 validate_fn: Callable[[torch.nn.Module], dict] | None = None,
                 group_fn: Callable[[object], object] | None = None):
        if len(samples) == 0:
            raise TrafficGymError("No training samples: the split is empty (or every scene was filtered out).")
        if cfg.max_steps < 1 or cfg.batch_size < 1:
            raise ValueError(f"max_steps and batch_size must be >= 1, got {cfg.max_steps}, {cfg.batch_size}.")
        self.model, self.loss_fn, self.samples, self.collate, self.cfg = model, loss_fn, samples, collate, cfg
        self.save_fn, self.validate_fn = save_fn, validate_fn
        # group_fn: samples of one global batch share its value (e.g. their map, so a batch encodes one map)
        self.groups = None
        if group_fn is not None:
            keys = [group_fn(x) for x in samples]
            self.groups = [np.flatnonzero([k == g for k in keys]) for g in dict.fromkeys(keys)]
            if all(len(g) < cfg.batch_size for g in self.groups):
                raise ValueError(f"No group of samples fills a batch of {cfg.batch_size}.")
        self.rank, self.world = rank_and_world()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {self.world} processes.")
        self.out = Path(cfg.out)
        self.step, self.epoch, self.cursor = 0, 0, 0
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.history: list[dict] = []

    # ---- schedule and data -------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        t = min(step / max(self.cfg.max_steps, 1), 1.0)
        low = self.cfg.final_lr_fraction
        return self.cfg.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t)))

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(self.cfg.seed + epoch)
        if self.groups is None:
            return rng.permutation(len(self.samples))
        # whole batches from one group each, in random order (each group's remainder waits for another epoch)
        bs = self.cfg.batch_size
        chunks = [c for g in self.groups for c in rng.permutation(g)[:len(g) // bs * bs].reshape(-1, bs)]
        return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])

    def next_batch(self) -> list:
        """This rank's share of the next global batch."""
        order = self._order(self.epoch)
        picked = []
        while len(picked) < self.cfg.batch_size:
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order(self.epoch)
            picked.append(int(order[self.cursor]))
            self.cursor += 1
        return [self.samples[i] for i in picked[self.rank::self.world]]

    # ---- one step ----------------------------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss_sum, count, metrics = self.loss_fn(self.model, batch)
        total = torch.as_tensor(float(count))
        if self.world > 1:
            dist.all_reduce(total)
        loss = loss_sum * self.world / total.clamp(min=1)  # DDP averages over ranks: the global mean
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:  # average the gradients (every parameter on every rank: unused ones count as 0)
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        out = {"loss": float(loss.detach()) / self.world, "grad_norm": float(grad_norm),
               "lr": self.lr_at(self.step - 1), "targets": float(total)}
        out.update({k: float(v) for k, v in metrics.items()})
        return out

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        if self.rank != 0:
            return None
        name, config = self.save_fn(self.model)
        tensors = dict(self.model.state_dict())
        state = self.optimizer.state_dict()
        for i, st in state["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = torch.as_tensor(v)
        extra = {"step": self.step, "epoch": self.epoch, "cursor": self.cursor, "param_groups": state["param_groups"],
                 "train_config": self.cfg.__dict__}
        return save_checkpoint(self.out / CHECKPOINT, name, config, tensors, extra=extra)

    def save_weights(self) -> Path | None:
        """``DIR/model.safetensors``: the model's tensors and config without the optimizer (a third of the size)."""
        if self.rank != 0:
            return None
        name, config = self.save_fn(self.model)
        return save_checkpoint(self.out / WEIGHTS, name, config, dict(self.model.state_dict()),
                               extra={"step": self.step, "train_config": self.cfg.__dict__})

    def load(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path} (train without --resume first).")
        name, _ = self.save_fn(self.model)
        _, tensors, extra = load_checkpoint(path, expected_agent=name)
        from agents.checkpoint import load_state_dict_strict

        load_state_dict_strict(self.model, {k: v for k, v in tensors.items() if not k.startswith("optim.")}, path)
        state: dict = {"state": {}, "param_groups": extra["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, k = key.split(".", 2)
                state["state"].setdefault(int(i), {})[k] = value
        self.optimizer.load_state_dict(state)
        self.step, self.epoch, self.cursor = int(extra["step"]), int(extra["epoch"]), int(extra["cursor"])

    # ---- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        if cfg.resume:
            self.load()
        writer = self._writer() if self.rank == 0 else None
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0.0
        while self.step < cfg.max_steps:
            out = self.train_step(self.collate(self.next_batch()))
            tokens += out["targets"]
            out["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
            self.history.append({"step": self.step, **out})
            if writer is not None and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                for k, v in out.items():
                    writer.add_scalar(f"train/{k}", v, self.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", acc=f"{out.get('accuracy', float('nan')):.3f}",
                                tok_s=f"{out['tokens_per_s']:.0f}")
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            if self.validate_fn and cfg.val_every and self.step % cfg.val_every == 0:
                self._validate(writer)
        if bar is not None:
            bar.close()
        self.save()
        self.save_weights()
        validated = [h["step"] for h in self.history if any(k.startswith("val/") for k in h)]
        if self.validate_fn and (not validated or validated[-1] != self.step):
            self._validate(writer)
        if writer is not None:
            writer.close()
        return self.history

    def _validate(self, writer) -> None:
        if self.rank != 0:
            return
        result = self.validate_fn(self.model)
        self.history.append({"step": self.step, **{f"val/{k}": v for k, v in result.items()}})
        if writer is not None:
            for k, v in result.items():
                writer.add_scalar(f"val/{k}", v, self.step)
        (self.out / "val.jsonl").open("a").write(json.dumps({"step": self.step, **result}) + "\n")

    def _writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrafficGymError('TensorBoard is not installed: pip install "protobuf>=6.31.1,<8" '
                                  '"tensorboard>=2.20,<3" (the README explains why setup.py cannot).') from e
        self.out.mkdir(parents=True, exist_ok=True)
        return SummaryWriter(str(self.out / "tb"))
