"""The ``trafficgym`` command: the one outermost module wiring envs, agents, training and render.

Subcommands grow with the project; today: ``data info`` and ``data generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from envs.errors import TrafficGymError


def _data_info(args: argparse.Namespace) -> int:
    splits = [args.split] if args.split else None
    if splits is None:

        splits = _available_splits(args)
    result = {}
    for split in splits:
        start = time.perf_counter()
        ds = _open(args, split)
        args.rebuild = False  # once per command, not once per split
        info = ds.info()
        info["open_s"] = round(time.perf_counter() - start, 3)
        result[split] = info
    if args.json:
        print(json.dumps(result if len(result) > 1 else next(iter(result.values())), indent=1))
    else:
        _print_info_table(result)
    return 0


def _available_splits(args: argparse.Namespace) -> list[str]:
    """Splits to report when none is given: the dataset's train/val/test where present."""
    from envs.data.scene_cache import TOWNS
    from envs.data.trajdata_source import TrajdataSource

    if args.dataset == TOWNS:
        return ["train", "val", "test"]
    if args.data_dir is None:
        from envs.data import open_dataset

        open_dataset(args.dataset, "train", data_dir=None)  # raises the clear "needs --data-dir" error
    src = TrajdataSource(args.dataset, args.data_dir, "/nonexistent")
    return list(src.splits())


def _print_info_table(result: dict) -> None:
    first = next(iter(result.values()))
    print(f"dataset {first['dataset']}  ({first['data_dir']})  dt {first['dt']} s")
    header = f"{'split':<8}{'scenes':>8}{'length':>10}{'agents':>9}{'mean/scene':>12}{'min':>6}{'max':>6}  per type"
    print(header)
    print("-" * len(header))
    for split, info in result.items():
        types = ", ".join(f"{k} {v}" for k, v in info["agents_per_type"].items() if v)
        length = info["scene_length_s"]
        print(f"{split:<8}{info['scenes']:>8}{str(length) + ' s':>10}{info['agents']:>9}"
              f"{info['mean_agents_per_scene']:>12}{info['min_agents_per_scene']:>6}{info['max_agents_per_scene']:>6}"
              f"  {types}")
    maps: dict = {}
    for info in result.values():
        maps.update(info["maps"])
    print(f"\n{'map':<40}{'lanes':>7}{'boundaries':>12}{'road edges':>12}{'successors':>12}")
    for map_id, c in maps.items():
        print(f"{map_id:<40}{c['lanes']:>7}{c['lane_boundaries']:>12}{c['road_edges']:>12}"
              f"{c['lane_successor_edges']:>12}")


def _data_maps(args: argparse.Namespace) -> int:
    from envs.types import PolylineType
    from render.map_figure import save_map_figure

    ds = _open(args, args.split)
    first_scene: dict[str, int] = {}
    for i in range(len(ds)):
        first_scene.setdefault(ds.entry(i).map_id, i)
    for map_id, i in first_scene.items():
        scene = ds[i]
        m = scene.map
        width, height = m.extent[2] - m.extent[0], m.extent[3] - m.extent[1]
        title = (f"{map_id.split(':')[-1]}: {width:.0f} x {height:.0f} m, "
                 f"{m.count(PolylineType.LANE_CENTER)} lanes, {scene.num_agents} agents")
        out = save_map_figure(Path(args.out) / f"{map_id.split(':')[-1]}.png", m, scene, step=args.step, title=title)
        print(out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    _data_info(argparse.Namespace(dataset="towns", data_dir=None, split=None, cache_dir=None, dt=None,
                                  case_length=None, rebuild=False, json=False))
    run_demo(num_scenes=args.scenes, out_dir=Path(args.out))
    return 0


def _agent_args(pairs: list[str] | None, option: str = "--agent-arg", example: str = "top_k=48") -> dict:
    """``--agent-arg KEY=VALUE`` (or another ``option``'s) pairs as a config dict (values read as JSON where they
    parse: numbers, booleans; otherwise kept as strings)."""
    from envs.errors import TrafficGymError

    config = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TrafficGymError(f"{option} expects KEY=VALUE (e.g. {example}), got {pair!r}.")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def _eval(args: argparse.Namespace) -> int:
    from agents.registry import AGENTS, available_agents
    from training.evaluate import evaluate, format_metric_table

    available_agents()  # registers the built-in agents
    # --checkpoint goes to the agents that have weights (e.g. --agent smart --agent constant_velocity); with
    # none of those it goes everywhere, so the "takes no checkpoint" error names the mistake
    weighted = [n for n in args.agent if getattr(AGENTS.get(n), "has_weights", False)]
    config = _agent_args(args.agent_arg)
    if config and len(set(args.agent)) > 1 and not weighted:
        from envs.errors import TrafficGymError

        raise TrafficGymError("--agent-arg with several --agent: it goes to the agents with weights, and none of "
                              f"{args.agent} has any; evaluate one agent at a time.")
    weighted = weighted or list(args.agent)  # one agent (or only baselines): options and checkpoint go to it
    ds = _open(args, args.split)
    results = []
    for name in args.agent:
        ckpt = args.checkpoint if name in weighted else None
        result = evaluate(name, ds, num_rollouts=args.rollouts, setting=args.setting, traffic=args.traffic,
                          num_scenes=args.scenes, seed=args.seed, checkpoint=ckpt,
                          traffic_checkpoint=args.traffic_checkpoint, agent_config=config if name in weighted else {},
                          metrics=args.metric, save_dir=args.save_rollouts and str(Path(args.save_rollouts) / name),
                          progress_bar=True)
        if result is None:  # a non-zero torchrun rank: rank 0 reports
            return 0
        results.append(result)
    first = results[0]
    print(f"{first['dataset']}/{first['split']}: {first['scenes']} scenes x {first['rollouts']} rollouts, "
          f"setting {first['setting']}" + (f", traffic {first['traffic']}" if first["setting"] == "ego" else ""))
    print(format_metric_table(results))
    for r in results:
        print(f"{r['agent']}: rollouts {r['timing']['rollout_s_per_scene']:.2f} s/scene, metrics "
              f"{r['timing']['metrics_s_per_scene']:.2f} s/scene")
    if args.json:
        Path(args.json).write_text(json.dumps(results if len(results) > 1 else first, indent=1))
    return 0


def _render(args: argparse.Namespace) -> int:
    from render.renderer import RenderConfig
    from training.record import record_agent_video

    ds = _open(args, args.split)
    config = RenderConfig(width=args.size, height=args.size, px_per_m=args.px_per_m, camera=args.camera)
    out = record_agent_video(args.agent, ds, args.scene, args.out, setting=args.setting, traffic=args.traffic,
                             checkpoint=args.checkpoint, traffic_checkpoint=args.traffic_checkpoint,
                             agent_config=_agent_args(args.agent_arg),
                             side_by_side=args.side_by_side, config=config,
                             fps=args.fps, seed=args.seed)
    print(out)
    return 0


def _data_generate(args: argparse.Namespace) -> int:
    from envs.data.towns import generate_towns

    start = time.perf_counter()
    manifest = generate_towns(args.out, seed=args.seed, compress=args.compress, progress=True)
    print(json.dumps({"out": str(Path(args.out).resolve()), "seconds": round(time.perf_counter() - start, 1),
                      "splits": manifest.get("splits")}, indent=1))
    return 0


def _train_vocab(args: argparse.Namespace) -> int:
    from training.vocab import build_motion_vocabulary, save_vocabulary

    start = time.perf_counter()
    vocab = build_motion_vocabulary(_open(args, args.split), size=args.size, tol=args.tol,
                                    max_segments=args.max_segments, seed=args.seed)
    config = {"dataset": args.dataset, "split": args.split, "size": args.size, "max_segments": args.max_segments,
              "seed": args.seed}
    path = save_vocabulary(vocab, args.out, config)
    print(json.dumps({"out": str(path), "seconds": round(time.perf_counter() - start, 1), "tol_m": args.tol,
                      "per_type": vocab.stats}, indent=1))
    return 0


def _train_bc(args: argparse.Namespace) -> int:
    from training.bc import BC_AGENTS, train_bc
    from training.distributed import init_from_env
    from training.vocab import build_motion_vocabulary, load_vocabulary, save_vocabulary

    if args.agent not in BC_AGENTS:
        from envs.errors import UnknownNameError

        raise UnknownNameError("agent trainable by behaviour cloning", args.agent, BC_AGENTS)
    rank, world = init_from_env()
    out = Path(args.out)
    ds = _open(args, args.split)
    vocab_path = Path(args.vocab) if args.vocab else out / "vocab.safetensors"
    if args.init is not None:
        vocab = None  # the init checkpoint's
    elif vocab_path.exists():
        vocab = load_vocabulary(vocab_path)
    else:
        if world > 1:
            from envs.errors import TrafficGymError

            raise TrafficGymError(f"Under torchrun, build the vocabulary first (no {vocab_path}): "
                                  f"trafficgym train vocab --out {vocab_path}")
        vocab = build_motion_vocabulary(ds, seed=args.seed)
        save_vocabulary(vocab, vocab_path, {"dataset": args.dataset, "split": args.split})
    validate = None
    if args.val_scenes > 0 and rank == 0:
        from training.bc import closed_loop_validation

        validate = closed_loop_validation(_open(args, "val"), scenes=args.val_scenes, seed=args.seed,
                                          agent=args.agent)
    model, history = train_bc(ds, vocab, args.size, out, args.max_steps, batch_size=args.batch_size, lr=args.lr,
                              resume=args.resume, seed=args.seed, scenes=args.scenes, progress=rank == 0,
                              ckpt_every=args.ckpt_every, validate_fn=validate, val_every=args.val_every,
                              workers=args.workers, token_noise=args.token_noise, agent=args.agent,
                              init=args.init, pose_targets=args.pose_targets,
                              **{"dropout": args.dropout, **_agent_args(args.model_arg, "--model-arg", "k_m2a=32")})
    if rank == 0:
        last = [h for h in history if "loss" in h][-1]
        _print_run(out, history, world, ("accuracy", "top1_error"), tokens_per_s=round(last["tokens_per_s"]),
                   wall_s=round(history[-1].get("wall_s", 0.0), 1))
    return 0


def _print_run(out: Path, history: list[dict], world: int, metrics: tuple[str, ...] = (), **extra) -> None:
    """The JSON summary a training command prints: where the weights are, the last step's loss and ``metrics``
    (those it logged), ``extra``, the process count and the last validation."""
    last = [h for h in history if "loss" in h][-1]
    val = [h for h in history if any(k.startswith("val/") for k in h)]
    print(json.dumps({"weights": str(out / "model.safetensors"), "checkpoint": str(out / "last.safetensors"),
                      "steps": last["step"], "loss": round(last["loss"], 4),
                      **{k: round(last[k], 4) for k in metrics if k in last}, **extra, "processes": world,
                      "validation": val[-1] if val else None}, indent=1))


def _train_catk(args: argparse.Namespace) -> int:
    from agents.gmm_ego import GmmEgoAgent
    from agents.smart import SmartAgent
    from training.catk import train_catk
    from training.distributed import init_from_env

    classes = {"smart": SmartAgent, "gmm_ego": GmmEgoAgent}
    if args.agent not in classes:
        from envs.errors import UnknownNameError

        raise UnknownNameError("agent trainable by CAT-K", args.agent, classes)
    rank, world = init_from_env()
    out = Path(args.out)
    # a checkpoint of another agent raises CheckpointError naming it
    model = classes[args.agent].from_checkpoint(args.init).model
    lr, top_k = CATK_DEFAULTS[args.agent]
    lr, top_k = args.lr if args.lr is not None else lr, args.top_k if args.top_k is not None else top_k
    validate = None
    if args.val_scenes > 0 and rank == 0:
        from training.bc import closed_loop_validation

        validate = closed_loop_validation(_open(args, "val"), scenes=args.val_scenes, seed=args.seed,
                                          agent=args.agent)
    model, history = train_catk(model, _open(args, args.split), out, args.max_steps, batch_size=args.batch_size,
                                lr=lr, top_k=top_k, rollout=args.rollout, frozen=args.frozen,
                                scenes=args.scenes, seed=args.seed, resume=args.resume, progress=rank == 0,
                                ckpt_every=args.ckpt_every, validate_fn=validate, val_every=args.val_every,
                                init=str(args.init), tracking=args.tracking,
                                pose_targets=args.pose_targets, bc_mix=args.bc_mix)
    if rank == 0:
        _print_run(out, history, world, ("accuracy", "top1_error"), rollout=args.rollout)
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from training.diffusion import train_vae
    from training.distributed import init_from_env

    rank, world = init_from_env()
    out = Path(args.out)
    vae, history = train_vae(_open(args, args.split), out, args.max_steps, batch_size=args.batch_size, lr=args.lr,
                             beta=args.beta, beta_ramp=args.beta_ramp, horizon=args.horizon,
                             latent_dim=args.latent_dim, scenes=args.scenes,
                             val_ds=_open(args, "val") if args.val_scenes > 0 and rank == 0 else None,
                             val_scenes=args.val_scenes, val_every=args.val_every, seed=args.seed,
                             resume=args.resume, progress=rank == 0, ckpt_every=args.ckpt_every)
    if rank == 0:
        last = [h for h in history if "loss" in h][-1]
        _print_run(out, history, world, ("ade",), kl=round(last["kl"], 3))
    return 0


def _train_diffusion(args: argparse.Namespace) -> int:
    from agents.latent_diffusion import load_vae
    from training.diffusion import train_diffusion
    from training.distributed import init_from_env

    rank, world = init_from_env()
    out = Path(args.out)
    vae = load_vae(args.vae)
    validate = None
    if args.val_scenes > 0 and rank == 0:
        from training.bc import closed_loop_validation

        validate = closed_loop_validation(_open(args, "val"), scenes=args.val_scenes, seed=args.seed,
                                          agent="latent_diffusion")
    model, history = train_diffusion(_open(args, args.split), vae, out, args.max_steps, batch_size=args.batch_size,
                                     lr=args.lr, size=args.size, scenes=args.scenes, seed=args.seed,
                                     resume=args.resume, progress=rank == 0, ckpt_every=args.ckpt_every,
                                     validate_fn=validate, val_every=args.val_every,
                                     **_agent_args(args.model_arg, "--model-arg", "blocks=6"))
    if rank == 0:
        _print_run(out, history, world)
    return 0


def _train_gmm_ppo(args: argparse.Namespace) -> int:
    from envs.errors import InvalidOptionError
    from training.distributed import init_from_env
    from training.ppo import GmmPpoConfig, train_gmm_ppo

    if args.init is None:
        raise InvalidOptionError("--policy gmm_ego fine-tunes trained weights: give --init (a bundled name such as "
                                 "towns-gmm-catk, or a gmm_ego checkpoint file).")
    try:
        pose_std = tuple(float(x) for x in args.pose_std.split(","))
    except ValueError as e:
        raise InvalidOptionError(f"--pose-std takes 3 comma-separated numbers (x m, y m, heading rad), got "
                                 f"{args.pose_std!r}.") from e
    rank, _ = init_from_env()
    cfg = GmmPpoConfig(iterations=args.iterations, scenes=args.scenes_per_rollout, epochs=args.epochs,
                       minibatches=args.minibatches, lr=args.lr, gamma=args.gamma, ent_coef=args.ent_coef,
                       grad_clip=args.max_grad_norm, kl_coef=args.kl_coef, top_k=args.top_k, pose_std=pose_std,
                       traffic=args.traffic, collision_penalty=args.collision_penalty,
                       offroad_penalty=args.offroad_penalty, value_warmup=args.value_warmup,
                       val_every=args.val_every, val_scenes=args.eval_scenes, seed=args.seed)
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "cache_dir": args.cache_dir,
            "case_length": args.case_length}
    start = time.time()
    _, history = train_gmm_ppo(args.out, cfg, init=args.init, data=data, split=args.split, val_split=args.val_split,
                               resume=args.resume, progress=not args.quiet, scenes=args.scenes,
                               validate=args.eval_scenes > 0, ckpt_every=args.ckpt_every)
    if rank == 0:
        val = [h for h in history if any(k.startswith("val/") for k in h)]
        print(json.dumps({"weights": str(Path(args.out) / "model.safetensors"),
                          "checkpoint": str(Path(args.out) / "last.safetensors"), "iterations": cfg.iterations,
                          "wall_s": round(time.time() - start, 1), "validation": val[-1] if val else None},
                         indent=1))
    return 0


CATK_DEFAULTS = {"smart": (5e-5, 32), "gmm_ego": (1e-4, 3)}  # (lr, top-k) of CAT-K's two variants
PPO_POLICIES = ("mlp", "gmm_ego")
GMM_PPO_DEFAULTS = {"lr": 5e-5, "epochs": 2}  # the mlp defaults are the parser's
MLP_PPO_DEFAULTS = {"lr": 3e-4, "epochs": 5}


def _train_ppo(args: argparse.Namespace) -> int:
    from envs.errors import InvalidOptionError, UnknownNameError
    from envs.observation import ObsConfig
    from training.sb3_ppo import PpoMlpConfig, train_ppo_mlp

    if args.policy not in PPO_POLICIES:
        raise UnknownNameError("PPO policy", args.policy, PPO_POLICIES)
    defaults = GMM_PPO_DEFAULTS if args.policy == "gmm_ego" else MLP_PPO_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.policy == "gmm_ego":
        return _train_gmm_ppo(args)
    if args.init is not None:
        raise InvalidOptionError("--init is for --policy gmm_ego (the mlp policy trains from scratch).")
    try:
        net_arch = tuple(int(w) for w in args.net_arch.split(","))
    except ValueError as e:
        raise UnknownNameError("--net-arch (comma-separated layer widths, e.g. 256,256)", args.net_arch,
                               ["256,256"]) from e
    cfg = PpoMlpConfig(total_steps=args.steps, num_envs=args.num_envs, n_steps=args.n_steps,
                       batch_size=args.batch_size, n_epochs=args.epochs, lr=args.lr, gamma=args.gamma,
                       ent_coef=args.ent_coef, max_grad_norm=args.max_grad_norm, net_arch=net_arch,
                       log_std_init=args.log_std_init, traffic=args.traffic,
                       normalize_obs=not args.no_normalize_obs, collision_penalty=args.collision_penalty,
                       offroad_penalty=args.offroad_penalty, log_divergence_penalty=args.log_divergence_penalty,
                       terminate=not args.no_terminate,
                       obs=ObsConfig(flat=True, normalize=True, num_map_chunks=args.num_map_chunks,
                                     num_agents=args.num_agents), eval_every=args.eval_every,
                       eval_scenes=args.eval_scenes, seed=args.seed)
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "cache_dir": args.cache_dir,
            "case_length": args.case_length}
    start = time.time()
    history = train_ppo_mlp(args.out, cfg, data=data, resume=args.resume, progress=not args.quiet,
                            split=args.split, val_split=args.val_split)
    wall = time.time() - start
    print(json.dumps({"weights": str(Path(args.out) / "model.safetensors"),
                      "checkpoint": str(Path(args.out) / "last.safetensors"), "steps": history[-1]["step"],
                      "wall_s": round(wall, 1), "validation": history[-1]}, indent=1))
    return 0


def _add_dataset_args(parser: argparse.ArgumentParser, split_default: str | None, split_help: str) -> None:
    """The options every dataset-reading subcommand shares (they map 1:1 onto ``open_dataset``)."""
    parser.add_argument("--dataset", default="towns", help="'towns' or a trajdata dataset name")
    parser.add_argument("--data-dir", default=None, help="dataset files (not needed for towns)")
    parser.add_argument("--split", default=split_default, help=split_help)
    parser.add_argument("--cache-dir", default=None, help="cache root (default $TRAFFICGYM_HOME/cache)")
    parser.add_argument("--dt", type=float, default=None, help="resample to this step in seconds")
    parser.add_argument("--case-length", type=int, default=None,
                        help="frames per case for INTERACTION-layout data (default: towns.json, else 40)")
    parser.add_argument("--rebuild", action="store_true", help="discard and rebuild the scene cache")


def _open(args: argparse.Namespace, split: str):
    from envs.data import open_dataset

    return open_dataset(args.dataset, split, data_dir=args.data_dir, cache_dir=args.cache_dir, dt=args.dt,
                        rebuild=args.rebuild, case_length=args.case_length)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trafficgym", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the end-to-end demo run by `make demo`")
    demo.add_argument("--scenes", type=int, default=32, help="val scenes to roll out")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its files")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="closed-loop evaluation: rollouts per scene and every episode metric")
    ev.add_argument("--agent", action="append", required=True, help="registered agent name; repeat to compare")
    ev.add_argument("--checkpoint", default=None,
                    help="weights for an agent that has them: a file, or a bundled name (smart: towns-nano)")
    _add_dataset_args(ev, split_default="val", split_help="split to evaluate on")
    ev.add_argument("--scenes", type=int, default=None, help="first N scenes (default: all)")
    ev.add_argument("--rollouts", type=int, default=32, help="samples per scene (WOSAC: 32)")
    ev.add_argument("--setting", default="sim_agents", choices=["sim_agents", "ego"],
                    help="sim_agents: the agent drives every agent valid at step 10; ego: the ego only")
    ev.add_argument("--traffic", default="log", help="ego setting: who drives the others (agent name or log)")
    ev.add_argument("--traffic-checkpoint", default=None, help="weights of the traffic agent (e.g. towns-nano)")
    ev.add_argument("--agent-arg", action="append", default=None, metavar="KEY=VALUE",
                    help="agent constructor option, repeatable (e.g. top_k=48 for smart, time_headway=1.2 for idm); "
                         "with several --agent it goes to the agents with weights")
    ev.add_argument("--metric", action="append", default=None, help="only these episode metrics (repeatable)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", default=None, help="also write the results (means and per scene) to this file")
    ev.add_argument("--save-rollouts", default=None,
                    help="write every scene's rollouts as npz (format: training/rollouts.py) under DIR/<agent>/")
    ev.set_defaults(func=_eval)

    ren = sub.add_parser("render", help="one closed-loop episode of an agent on one scene, as mp4 or gif")
    ren.add_argument("--agent", required=True, help="registered agent name (e.g. idm, log_replay)")
    ren.add_argument("--checkpoint", default=None, help="weights: a file, or a bundled name (smart: towns-nano)")
    ren.add_argument("--setting", default="sim_agents", choices=["sim_agents", "ego"],
                     help="sim_agents: the agent drives every agent valid at the start; ego: only the ego")
    ren.add_argument("--traffic", default="log", help="who drives the others in the ego setting (agent name or log)")
    ren.add_argument("--traffic-checkpoint", default=None, help="weights of the traffic agent (e.g. towns-nano)")
    ren.add_argument("--agent-arg", action="append", default=None, metavar="KEY=VALUE",
                     help="agent constructor option, repeatable (e.g. top_k=48)")
    _add_dataset_args(ren, split_default="val", split_help="split holding the scene")
    ren.add_argument("--scene", required=True, help="scene id (trafficgym data info lists the dataset)")
    ren.add_argument("--out", required=True, help="output .mp4 or .gif")
    ren.add_argument("--side-by-side", action="store_true", help="log on the left, simulation on the right")
    ren.add_argument("--camera", default="ego", choices=["ego", "scene"])
    ren.add_argument("--size", type=int, default=512, help="frame width and height in pixels")
    ren.add_argument("--px-per-m", type=float, default=4.0)
    ren.add_argument("--fps", type=float, default=None, help="default: real time")
    ren.add_argument("--seed", type=int, default=0)
    ren.set_defaults(func=_render)

    train = sub.add_parser("train", help="training: motion vocabulary, BC, CAT-K, PPO, action VAE, latent diffusion")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    voc = train_sub.add_parser("vocab", help="k-disk motion vocabulary per agent type from the training scenes")
    _add_dataset_args(voc, split_default="train", split_help="split to cluster")
    voc.add_argument("--size", type=int, default=2048, help="tokens per agent type (CAT-K: 2048)")
    voc.add_argument("--tol", type=float, default=0.05, help="k-disk radius: mean corner distance (m)")
    voc.add_argument("--max-segments", type=int, default=200_000, help="0.5 s segments sampled per agent type")
    voc.add_argument("--seed", type=int, default=0)
    voc.add_argument("--out", default="runs/vocab.safetensors", help="output file (safetensors)")
    voc.set_defaults(func=_train_vocab)
    bc = train_sub.add_parser("bc", help="behaviour cloning of the tokenized policy (also under torchrun)")
    bc.add_argument("--agent", default="smart", help="the model to train: smart (the tokenized policy) or gmm_ego "
                                                     "(the Gaussian-mixture ego policy)")
    bc.add_argument("--init", default=None,
                    help="gmm_ego: start the map encoder and agent decoder from these smart weights (a file or a "
                         "bundled name, e.g. towns-nano; their size and vocabulary are used)")
    bc.add_argument("--pose-targets", default="vehicles", choices=["vehicles", "ego"],
                    help="gmm_ego: train on the next pose of every vehicle (default) or of the scene's ego only")
    bc.add_argument("--size", default="nano",
                    help="nano (~1.0 M params), mini (~3.6 M) or tiny (~5.3 M), with a 2,048-token vehicle vocabulary")
    _add_dataset_args(bc, split_default="train", split_help="split to train on")
    bc.add_argument("--out", required=True, help="run folder: checkpoint, TensorBoard logs, vocabulary")
    bc.add_argument("--vocab", default=None, help="motion vocabulary file (default: OUT/vocab.safetensors, "
                                                  "built from the split if missing)")
    bc.add_argument("--max-steps", type=int, default=2000)
    bc.add_argument("--batch-size", type=int, default=4, help="scenes per global batch")
    bc.add_argument("--lr", type=float, default=5e-4)
    bc.add_argument("--dropout", type=float, default=0.1, help="dropout of every attention block (SMART: 0.1)")
    bc.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                    help="override a field of the size's configuration (repeatable), e.g. k_m2a=32 m2a_radius=30: "
                         "the map pieces each agent attends to and their radius (m)")
    bc.add_argument("--token-noise", type=int, default=1,
                    help="tokenize the training tracks drawing each applied token from the K nearest (1: none)")
    bc.add_argument("--scenes", type=int, default=None, help="only the first N scenes of the split")
    bc.add_argument("--ckpt-every", type=int, default=200, help="steps between checkpoints")
    bc.add_argument("--val-scenes", type=int, default=4,
                    help="closed-loop validation on N val scenes spread over the split (realism meta, minADE, "
                         "collision and off-road rates; 0: none)")
    bc.add_argument("--val-every", type=int, default=500, help="steps between validations (and at the end)")
    bc.add_argument("--workers", type=int, default=2, help="processes tokenizing the scenes at start-up")
    bc.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    bc.add_argument("--seed", type=int, default=0)
    bc.set_defaults(func=_train_bc)

    catk = train_sub.add_parser("catk", help="CAT-K closed-loop fine-tuning of the tokenized policy")
    catk.add_argument("--agent", default="smart", help="the model to fine-tune: smart or gmm_ego")
    catk.add_argument("--init", required=True, help="the BC weights to start from: a bundled name (towns-nano) or "
                                                   "a checkpoint file")
    _add_dataset_args(catk, split_default="train", split_help="split to fine-tune on")
    catk.add_argument("--out", required=True, help="run folder: checkpoint, TensorBoard logs")
    catk.add_argument("--max-steps", type=int, default=200)
    catk.add_argument("--batch-size", type=int, default=4, help="scenes per global batch")
    catk.add_argument("--lr", type=float, default=None, help="default: 5e-5 (smart), 1e-4 (gmm_ego), as CAT-K")
    catk.add_argument("--top-k", type=int, default=None,
                      help="candidates of the closest-among-top-k choice: tokens (smart, default 32) or mixture "
                           "components (gmm_ego, default 3)")
    catk.add_argument("--rollout", default="catk", help="catk (closest among top-k to the log), topk (sampling: "
                                                      "the ablation) or log (BC samples: the control)")
    catk.add_argument("--frozen", default="catk", help="what stays frozen: catk (map encoder and embeddings, as the "
                                                     "paper), decoder (the map encoder) or none")
    catk.add_argument("--tracking", default="pose", help="gmm_ego: how the rollout's bicycle follows the chosen "
                                                       "component, pose (lands on it) or speed (as in evaluation)")
    catk.add_argument("--pose-targets", default="ego", help="gmm_ego: train on the ego's rollout only (ego) or "
                                                           "also on every other vehicle's logged next pose (vehicles)")
    catk.add_argument("--bc-mix", type=int, default=0, metavar="N",
                      help="also train on each batch's behaviour-cloning samples with N-nearest token noise "
                           "(0: off)")
    catk.add_argument("--scenes", type=int, default=None, help="only the first N scenes of the split")
    catk.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    catk.add_argument("--val-scenes", type=int, default=4, help="closed-loop validation scenes (0: none)")
    catk.add_argument("--val-every", type=int, default=100, help="steps between validations (and at the end)")
    catk.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors (a CAT-K run)")
    catk.add_argument("--seed", type=int, default=0)
    catk.set_defaults(func=_train_catk)

    ppo = train_sub.add_parser("ppo", help="PPO in the ego env: an MLP policy by stable-baselines3 (--policy mlp) "
                                          "or fine-tuning of the Gaussian-mixture ego (--policy gmm_ego)")
    ppo.add_argument("--policy", default="mlp", help="the policy to train: mlp (SB3's MlpPolicy on the flat, "
                                                    "normalised ego observation) or gmm_ego (fine-tunes --init)")
    ppo.add_argument("--init", default=None, help="gmm_ego: the weights to start from (a bundled name, e.g. "
                                                  "towns-gmm-catk, or a checkpoint file)")
    ppo.add_argument("--dataset", default="towns", help="'towns' or a trajdata dataset name")
    ppo.add_argument("--data-dir", default=None, help="dataset files (not needed for towns)")
    ppo.add_argument("--split", default="train", help="split to train on")
    ppo.add_argument("--cache-dir", default=None, help="cache root (default $TRAFFICGYM_HOME/cache)")
    ppo.add_argument("--case-length", type=int, default=None,
                     help="frames per case for INTERACTION-layout data (default: towns.json, else 40)")
    ppo.add_argument("--val-split", default="val", help="split of the periodic evaluation")
    ppo.add_argument("--out", required=True, help="run folder: weights, checkpoint, TensorBoard logs, val.jsonl")
    ppo.add_argument("--traffic", default="log", help="who drives the other agents: log, idm or smart")
    ppo.add_argument("--steps", type=int, default=1_000_000, help="env steps in all")
    ppo.add_argument("--num-envs", type=int, default=16, help="scenes stepped in one batch")
    ppo.add_argument("--n-steps", type=int, default=256, help="steps per env and rollout")
    ppo.add_argument("--batch-size", type=int, default=512, help="minibatch of each gradient step")
    ppo.add_argument("--epochs", type=int, default=None, help="passes over each rollout (mlp 5, gmm_ego 2)")
    ppo.add_argument("--lr", type=float, default=None, help="mlp 3e-4; gmm_ego 5e-5 (cosine to 10 %%)")
    ppo.add_argument("--gamma", type=float, default=0.99)
    ppo.add_argument("--ent-coef", type=float, default=0.0)
    ppo.add_argument("--max-grad-norm", type=float, default=0.5)
    ppo.add_argument("--net-arch", default="256,256", help="hidden layer widths of actor and critic")
    ppo.add_argument("--log-std-init", type=float, default=-2.0, help="initial log std of the action noise")
    ppo.add_argument("--num-map-chunks", type=int, default=8,
                     help="map chunks in the observation (the env's default 48; fewer train faster and better)")
    ppo.add_argument("--num-agents", type=int, default=8, help="nearest agents in the observation (env default 16)")
    ppo.add_argument("--no-normalize-obs", action="store_true",
                     help="train on the env's fixed-scale observations without SB3's VecNormalize")
    ppo.add_argument("--collision-penalty", type=float, default=-20.0,
                     help="training reward per step in collision (the env's is -5; evaluation always scores the env's)")
    ppo.add_argument("--offroad-penalty", type=float, default=-20.0,
                     help="training reward per step off the road (the env's default -5)")
    ppo.add_argument("--log-divergence-penalty", type=float, default=0.0,
                     help="training reward per step and metre from the logged ego position (<= 0; the env's 0)")
    ppo.add_argument("--no-terminate", action="store_true",
                     help="training episodes go on after a collision or leaving the road (the penalties then recur "
                          "every step there); evaluation episodes still end")
    ppo.add_argument("--eval-every", type=int, default=100_000, help="env steps between evaluations on val")
    ppo.add_argument("--eval-scenes", type=int, default=32, help="val scenes per evaluation (spread over the split)")
    ppo.add_argument("--iterations", type=int, default=150, help="gmm_ego: rollouts in all")
    ppo.add_argument("--scenes-per-rollout", type=int, default=16, help="gmm_ego: scenes of each rollout")
    ppo.add_argument("--minibatches", type=int, default=2, help="gmm_ego: gradient steps per pass over a rollout")
    ppo.add_argument("--kl-coef", type=float, default=0.1, help="gmm_ego: weight of the KL to the initial policy")
    ppo.add_argument("--pose-std", default="0.5,0.5,0.05",
                     help="gmm_ego: exploration noise of the pose around the chosen component (x m, y m, heading)")
    ppo.add_argument("--top-k", type=int, default=3, help="gmm_ego: the components each decision draws among")
    ppo.add_argument("--value-warmup", type=int, default=5, help="gmm_ego: first iterations train the value only")
    ppo.add_argument("--val-every", type=int, default=25, help="gmm_ego: iterations between validations")
    ppo.add_argument("--scenes", type=int, default=None, help="gmm_ego: only the first N scenes of the split")
    ppo.add_argument("--ckpt-every", type=int, default=50, help="gmm_ego: gradient steps between checkpoints")
    ppo.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    ppo.add_argument("--quiet", action="store_true", help="no progress bar or per-evaluation lines")
    ppo.add_argument("--seed", type=int, default=0)
    ppo.set_defaults(func=_train_ppo)

    vae = train_sub.add_parser("vae", help="the latent diffusion policy, stage 1: the action VAE (also under "
                               "torchrun)")
    _add_dataset_args(vae, split_default="train", split_help="split to train on")
    vae.add_argument("--out", required=True, help="run folder: checkpoint, TensorBoard logs")
    vae.add_argument("--max-steps", type=int, default=3000)
    vae.add_argument("--batch-size", type=int, default=256, help="action sequences per global batch")
    vae.add_argument("--lr", type=float, default=1e-3)
    vae.add_argument("--beta", type=float, default=0.01, help="KL weight at the end of its ramp")
    vae.add_argument("--beta-ramp", type=float, default=0.5, help="fraction of the steps over which the KL weight "
                     "rises from 0 to --beta")
    vae.add_argument("--horizon", type=int, default=52, help="future steps per sequence (a multiple of 4)")
    vae.add_argument("--latent-dim", type=int, default=8, help="channels of each latent step")
    vae.add_argument("--scenes", type=int, default=None, help="only the first N scenes of the split")
    vae.add_argument("--val-scenes", type=int, default=32, help="val scenes whose reconstruction is logged (0: none)")
    vae.add_argument("--val-every", type=int, default=500, help="steps between validations (and at the end)")
    vae.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    vae.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    vae.add_argument("--seed", type=int, default=0)
    vae.set_defaults(func=_train_vae)

    dif = train_sub.add_parser("diffusion", help="the latent diffusion policy, stage 2: the latent denoiser on a "
                               "trained VAE (also under torchrun)")
    _add_dataset_args(dif, split_default="train", split_help="split to train on")
    dif.add_argument("--vae", required=True, help="the trained action VAE (RUN/model.safetensors of train vae)")
    dif.add_argument("--out", required=True, help="run folder: checkpoint, TensorBoard logs")
    dif.add_argument("--size", default="nano", help="model size preset: nano, mini")
    dif.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                     help="override a DiffusionConfig field (repeatable), e.g. blocks=6")
    dif.add_argument("--max-steps", type=int, default=2000)
    dif.add_argument("--batch-size", type=int, default=16, help="scenes per global batch (each at one replanning step)")
    dif.add_argument("--lr", type=float, default=5e-4)
    dif.add_argument("--scenes", type=int, default=None, help="only the first N scenes of the split")
    dif.add_argument("--val-scenes", type=int, default=4, help="closed-loop validation scenes (0: none)")
    dif.add_argument("--val-every", type=int, default=500, help="steps between validations (and at the end)")
    dif.add_argument("--ckpt-every", type=int, default=200, help="steps between checkpoints")
    dif.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    dif.add_argument("--seed", type=int, default=0)
    dif.set_defaults(func=_train_diffusion)

    data = sub.add_parser("data", help="datasets: statistics, cache, generation of the towns data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="scene count, agents per type, map statistics (builds the cache)")
    _add_dataset_args(info, split_default=None, split_help="one split (default: train, val and test)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_data_info)

    maps = data_sub.add_parser("maps", help="write a PNG of each map with the first scene's agents")
    _add_dataset_args(maps, split_default="val", split_help="split whose first scene per map is drawn")
    maps.add_argument("--step", type=int, default=10, help="which step of the scene to draw")
    maps.add_argument("--out", default="docs", help="output folder")
    maps.set_defaults(func=_data_maps)

    gen = data_sub.add_parser("generate", help="regenerate the towns dataset with SUMO (needs the sumo extra)")
    gen.add_argument("--out", required=True, help="output directory")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--compress", action="store_true",
                     help="write the committed-asset form (as in envs/data/towns/assets) instead of plain files")
    gen.set_defaults(func=_data_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrafficGymError as e:
        print(f"trafficgym: error: {e}", file=sys.stderr)
        return 2
    finally:
        from training.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
