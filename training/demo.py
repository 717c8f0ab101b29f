"""The end-to-end demo behind ``make demo``: what the project can do today, on the bundled towns data.

1. sim agents: every agent valid at the start step driven for 8 s by the learned tokenized policy (the bundled
   ``DEMO_POLICY`` weights) and by each baseline: 8 rollouts per scene, the realism meta-metric, collision /
   off-road rates, minADE, distance travelled (``trafficgym eval --rollouts 8`` with those metrics; the README's
   tables use all 128 scenes and 32 rollouts);
2. ego: the ``trafficgym/Ego-v0`` vector env with reactive traffic (IDM, then the learned policy), driven by two
   reference controllers and by the learned ego policy (the bundled ``towns-gmm-ppo`` weights, through
   ``agents.env_policy.AgentPolicy``);
3. a video: the learned policy driving every agent of one val scene, next to the log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

# the best bundled learned policy (chosen on towns val; the README's tables compare them on test)
DEMO_POLICY = "towns-nano-3k"
DEMO_EGO_POLICY = "towns-gmm-ppo"  # the learned ego of the ego-env rows (the best on towns val)
# (agent, checkpoint): the learned policy with its bundled weights, then the baselines
DEMO_AGENTS = (("smart", DEMO_POLICY), ("log_replay", None), ("idm", None), ("constant_velocity", None),
               ("random", None))
DEMO_METRICS = ("realism", "blm_safety", "min_ade", "distance_travelled")
DEMO_ROWS = ("realism_meta_wosac2024", "realism_collision", "realism_offroad", "blm_collision_rate", "blm_offroad_rate",
             "min_ade", "distance_travelled")
DEMO_ROLLOUTS = 8
DEMO_VIDEO_SCENE = "DR_USA_Town_Spider_val_17"  # a busy junction


def log_following_actions(engine) -> np.ndarray:
    """The ego's logged motion as normalised bicycle actions (an ego controller that imitates the log)."""
    from envs.dynamics import InvertibleBicycle

    st = engine.state
    b = torch.arange(st.batch_size)
    nxt = st.log[b, st.ego, (st.t + 1).clamp(max=st.num_steps - 1)]
    phys = InvertibleBicycle().inverse(st.current[b, st.ego], nxt, st.dt).numpy()
    return np.where(phys >= 0, phys / engine.physical_high, -phys / engine.physical_low).astype(np.float32)


def ego_rollouts(num_scenes: int, traffic="idm") -> list[dict]:
    """The reference ego controllers and the learned ego policy (through ``agents.env_policy.AgentPolicy``) on
    the first ``num_scenes`` val scenes; one summary row each."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the env ids)

    n = num_scenes
    venv = gym.make_vec("trafficgym/Ego-v0", num_envs=n, vectorization_mode="vector_entry_point", split="val",
                        action_bounds="clip", traffic=traffic)
    from agents.env_policy import AgentPolicy
    from agents.registry import make_agent

    learned = AgentPolicy(venv, make_agent("gmm_ego", checkpoint=DEMO_EGO_POLICY))
    controllers = {"log-following": lambda: log_following_actions(venv.unwrapped.engine),
                   "coasting (zero action)": lambda: np.zeros((n, 2), np.float32),
                   f"learned ego (gmm_ego {DEMO_EGO_POLICY})": lambda: learned(None)}
    rows = []
    for name, policy in controllers.items():
        venv.reset(seed=0, options={"scene_index": list(range(n))})
        ret, done = np.zeros(n), np.zeros(n, bool)
        collided, offroad, progress = (np.zeros(n) for _ in range(3))
        steps, start = 0, time.perf_counter()
        while not done.all():
            _, reward, terminated, truncated, info = venv.step(policy())
            live = ~done
            ret[live] += reward[live]
            m = info["metrics"]
            collided[live] = np.maximum(collided[live], m["collision"][live])
            offroad[live] = np.maximum(offroad[live], m["offroad"][live])
            progress[live] = m["progress"][live]
            done |= terminated | truncated
            steps += int(live.sum())
        rows.append({"controller": name, "return": float(ret.mean()), "collided": float(collided.mean()),
                     "offroad": float(offroad.mean()), "progress_m": float(progress.mean()),
                     "env_steps_per_s": steps / (time.perf_counter() - start)})
    return rows


def run_demo(num_scenes: int = 32, out_dir: Path = Path("runs/demo")) -> dict:
    from envs.data import open_dataset
    from training.evaluate import evaluate, format_metric_table

    out_dir.mkdir(parents=True, exist_ok=True)
    val = open_dataset("towns", "val")
    print(f"\nsim agents: {num_scenes} towns val scenes x {DEMO_ROLLOUTS} rollouts, every agent valid at step 10 "
          "driven for 8 s")
    sim_rows = [evaluate(name, val, num_rollouts=DEMO_ROLLOUTS, num_scenes=num_scenes, metrics=DEMO_METRICS,
                         checkpoint=ckpt) for name, ckpt in DEMO_AGENTS]
    shown = [{**r, "metrics": {k: r["metrics"][k] for k in DEMO_ROWS}} for r in sim_rows]
    print(format_metric_table(shown))
    for r in sim_rows:
        print(f"{r['agent']}: {r['timing']['rollout_s_per_scene']:.2f} s per scene ({DEMO_ROLLOUTS} rollouts)")

    from agents.registry import make_agent

    ego_rows = []
    for label, traffic in (("IDM", "idm"), ("learned (smart)", make_agent("smart", checkpoint=DEMO_POLICY))):
        print(f"\nego (trafficgym/Ego-v0, vector env): {num_scenes} val scenes, reactive {label} traffic")
        rows = ego_rollouts(num_scenes, traffic)
        print(f"{'controller':<34}{'return':>8}{'collided':>10}{'off-road':>10}{'progress m':>12}{'env steps/s':>13}")
        for r in rows:
            print(f"{r['controller']:<34}{r['return']:>8.2f}{r['collided']:>10.2f}{r['offroad']:>10.2f}"
                  f"{r['progress_m']:>12.1f}{r['env_steps_per_s']:>13,.0f}")
        ego_rows += [{"traffic": label, **r} for r in rows]
    from training.record import record_agent_video

    video = record_agent_video("smart", val, DEMO_VIDEO_SCENE, out_dir / "smart_vs_log.mp4", side_by_side=True,
                               checkpoint=DEMO_POLICY)
    result = {"sim_agents": [{k: v for k, v in r.items() if k != "per_scene"} for r in sim_rows], "ego": ego_rows,
              "video": str(video)}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {video} (log | learned policy, side by side) and {out_dir / 'demo.json'}")
    return result
