"""trafficgym environments: the simulator and everything a user of ``gym.make`` touches.

Importing this package registers the environment ids::

    import gymnasium as gym
    import envs  # noqa: F401  (registers trafficgym/*)
    env = gym.make("trafficgym/Ego-v0", split="val")
"""

from gymnasium.envs.registration import register, registry

from envs.parallel import register_fork_safety

register_fork_safety()  # forked children (async vector envs, multiprocessing) start single-threaded

ENV_IDS = ("trafficgym/Ego-v0", "trafficgym/SimAgents-v0")

if "trafficgym/Ego-v0" not in registry:
    register(id="trafficgym/Ego-v0", entry_point="envs.traffic_env:EgoEnv",
             vector_entry_point="envs.vector_env:EgoVectorEnv")
    register(id="trafficgym/SimAgents-v0", entry_point="envs.traffic_env:SimAgentsEnv",
             vector_entry_point="envs.vector_env:SimAgentsVectorEnv")
