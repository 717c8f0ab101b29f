"""How far a CAT-K rollout strays from the log, by K: the bundled BC weights roll out the first 4 towns *train*
scenes of one map by closest-among-top-K (``training/catk.py: catk_samples``), and the distance between rollout
and log is measured at every 0.5 s boundary the policy drove (mean, 90th percentile, max). Prints one JSON
object.

    python benchmarks/catk_drift.py [--k 32,16,8,4,1] [--scenes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import torch

from agents.smart import SmartAgent
from agents.smart.agent import CatKRollout
from envs.data import open_dataset
from training.catk import catk_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="32,16,8,4,1")
    p.add_argument("--scenes", type=int, default=4)
    args = p.parse_args()
    ds = open_dataset("towns", "train")
    model = SmartAgent.from_checkpoint("towns-nano").model.eval()
    first = ds.entry(0).map_id
    ids = [i for i in range(len(ds)) if ds.entry(i).map_id == first][:args.scenes]
    scenes = [ds[i] for i in ids]
    result = {"benchmark": "catk_drift", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "scenes": [s.scene_id for s in scenes], "distance_m": {}}
    for k in (int(x) for x in args.k.split(",")):
        samples = catk_samples(CatKRollout(model, top_k=k), scenes, [ds.map_index(s.map_id) for s in scenes])
        d = []
        for scene, sample in zip(scenes, samples, strict=True):
            steps = np.arange(sample.pose.shape[1]) * 5
            ok = sample.valid & scene.valid[:, steps] & (sample.target >= 0)
            d.append(np.linalg.norm(sample.pose[..., :2] - scene.trajectory[:, steps, :2], axis=-1)[ok])
        d = np.concatenate(d)
        result["distance_m"][f"K={k}"] = {"mean": round(float(d.mean()), 3),
                                          "p90": round(float(np.percentile(d, 90)), 3),
                                          "max": round(float(d.max()), 2), "agent_steps": int(d.size)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
