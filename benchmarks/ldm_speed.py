"""Latent diffusion policy speed: the cost of closed-loop 8 s rollouts of towns val scenes with every vehicle
driven (seconds per scene for R = 1 and R = 32 rollouts in one batch, DDIM steps as given), and the training
throughput of both stages (VAE: action sequences per second; diffusion: steps of 16 scenes per second). Prints
JSON.

    python benchmarks/ldm_speed.py --checkpoint RUN/model.safetensors [--ddim-steps 20] [--scenes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def rollout_cost(agent, ds, scenes: int, rollouts: int) -> float:
    """Mean seconds per scene of ``simulate_scene`` with ``rollouts`` samples (after one warm-up scene)."""
    from training.rollouts import simulate_scene

    simulate_scene(agent, ds, 0, rollouts, seed=0)
    start = time.perf_counter()
    for i in range(1, scenes + 1):
        simulate_scene(agent, ds, i, rollouts, seed=i)
    return (time.perf_counter() - start) / scenes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a latent diffusion checkpoint (or a bundled name)")
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--scenes", type=int, default=4, help="timed val scenes per rollout count")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per stage")
    args = p.parse_args()

    from agents.latent_diffusion import LatentDiffusionAgent, LatentDiffusionModel, load_diffusion
    from envs.data import open_dataset
    from training.diffusion import diffusion_items
    from training.diffusion_data import dataset_actions, diffusion_batch

    train, val = open_dataset("towns", "train"), open_dataset("towns", "val")
    model = load_diffusion(args.checkpoint)
    agent = LatentDiffusionAgent(model, ddim_steps=args.ddim_steps)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "threads": torch.get_num_threads(), "checkpoint": args.checkpoint, "ddim_steps": args.ddim_steps,
           "params": sum(x.numel() for x in model.parameters() if x.requires_grad),
           "vae_params": sum(x.numel() for x in model.vae.parameters())}
    with torch.no_grad():
        out["rollout_s_per_scene"] = {f"R{r}": round(rollout_cost(agent, val, args.scenes, r), 3) for r in (1, 32)}

    vae = model.vae
    data = dataset_actions(train, vae.cfg.horizon, scenes=32)
    opt = torch.optim.Adam(vae.parameters(), 1e-4)
    vae.train()
    for p_ in vae.parameters():
        p_.requires_grad_(True)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        loss, n, _ = vae.loss(data[torch.randint(len(data), (256,))])
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    out["vae_sequences_per_s"] = round(256 * args.train_steps / (time.perf_counter() - start))

    fresh = LatentDiffusionModel(model.cfg, load_diffusion(args.checkpoint).vae)
    items = diffusion_items(train, 64, vae.cfg.horizon)
    opt = torch.optim.Adam([x for x in fresh.parameters() if x.requires_grad], 1e-4)
    by_map: dict = {}
    for i, t in items:
        by_map.setdefault(train.entry(i).map_id, []).append((i, t))
    group = max(by_map.values(), key=len)
    batches = [diffusion_batch([(train[i], t) for i, t in group[k * 16:(k + 1) * 16]], fresh.cfg, vae.cfg.horizon)
               for k in range(min(args.train_steps, len(group) // 16))]
    start = time.perf_counter()
    for b in batches:
        loss, n, _ = fresh.loss(b)
        opt.zero_grad()
        (loss / max(n, 1)).backward()
        opt.step()
    out["diffusion_steps_per_s_16_scenes"] = round(len(batches) / (time.perf_counter() - start), 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
