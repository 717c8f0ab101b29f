"""trafficgym environments: the simulator and everything a user of ``gym.make`` touches."""
