"""trafficgym: a Gymnasium-registered, closed-loop, multi-agent traffic simulator and its agents."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="trafficgym",
    version="0.1.0",
    description="Closed-loop multi-agent traffic simulation for Gymnasium, with learned sim agents.",
    long_description=README.read_text() if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["envs", "envs.*", "agents", "agents.*", "training", "training.*",
                                    "render", "render.*"]),
    package_data={"envs.data.towns": ["assets/*"], "agents": ["weights/*.safetensors"]},
    install_requires=[
        # A range, not a pin: users bring their own (CUDA) builds. The Makefile installs the local CPU
        # build torch==2.13.0 first so that nothing pulls a multi-GB CUDA wheel.
        "torch>=2.1,<3",
        "gymnasium>=1.0,<2",
        "numpy>=1.24",
        "shapely>=2.0",
        "scipy>=1.9",  # distance transforms (map SDF) and KD-trees (IDM lane lookup)
        "pillow>=9",  # rasterising the drivable area
        # trajdata 1.4.0 is the data layer; its `interaction` extra brings lanelet2 (our default data's
        # map format). Its numpy-2 / zarr-3 / fixed-case-length issues are worked around in
        # envs/data/trajdata_source.py.
        "trajdata[interaction]==1.4.0",
        "zarr>=2.11",
        "pandas>=1.4",
        "pyarrow>=7",
        "tqdm>=4.62",
        "matplotlib>=3.5",
        "pygame>=2.5",
        "imageio>=2.31",
        "imageio-ffmpeg>=0.4.9",
        "stable-baselines3>=2.3",
        "rich>=13",  # SB3's progress bar (trafficgym train ppo) needs it beside tqdm
        "safetensors>=0.4",
        # Compiled loops for the per-pair work that is dispatch-bound as torch ops at this size (IDM's
        # obstacle search). 0.60 is the first release with numpy 2 support.
        "numba>=0.60",
    ],
    extras_require={
        # Regenerating the default "towns" dataset. Pinned: byte-identical output needs the same SUMO.
        "sumo": ["eclipse-sumo==1.28.0", "sumolib==1.28.0"],
        # The PettingZoo view of the sim-agents env (envs/multi_agent.py).
        "marl": ["pettingzoo>=1.24"],
        # Gymnasium's RecordVideo wrapper writes through moviepy.
        "video": ["moviepy>=1.0"],
        "dev": ["pytest>=7", "hypothesis>=6", "ruff>=0.4", "moviepy>=1.0", "import-linter>=2.1"],
    },
    entry_points={"console_scripts": ["trafficgym=training.cli:main"]},
)
