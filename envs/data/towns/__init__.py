"""The default "towns" dataset: SUMO traffic written in the INTERACTION prediction-challenge layout.

No driving dataset can be downloaded where trafficgym is developed, so the project makes its own. Four
small towns (``USA_Town_Grid``: 4 x 4 grid, two lanes each way; ``USA_Town_Spider``: six radial arms and
three rings; ``USA_Town_Random``: an irregular netgenerate network; ``USA_Town_Roundabout``: a two-lane
roundabout on an arterial with T-junctions), each 400-600 m across, are simulated with Eclipse SUMO at
0.1 s. All junctions are unsignalised (priority rules and the roundabout), because the INTERACTION
format has no traffic-light channel. Traffic is seeded Poisson trips between fringe edges, so vehicles
enter and leave at the map border, with a mix of cars (three sizes), vans, trucks and buses whose boxes
come from their SUMO vTypes; lane changes are continuous (3 s), teleports are off. Cases are 91-frame
(9.1 s) windows every 3 s of long runs after a 120 s warm-up; train, val and test are separate runs
with different seeds. Each case holds every vehicle present in any of its frames (tracks may start or
end inside it) and at least one vehicle present throughout. Boxes keep their front on SUMO's
front-bumper FCD path and their centre is towed L/2 behind it without sideways slip (a tractrix, computed
on each whole track from insertion; see ``simulate.front_path_to_box``), headings are counter-clockwise
from +x in radians (direction centre -> front), velocities are the centre's speed along the heading; all
values are rounded to 3 decimals. Maps are Lanelet2 OSM,
one lanelet per SUMO lane including junction-internal lanes, with shared boundaries so that Lanelet2's
routing graph has successors and neighbours. Not included: pedestrians and cyclists (the format would
reduce them to a fixed 0.75 m box with a velocity-derived heading), traffic lights, parked vehicles,
crosswalks and stop lines, elevation, sensor noise or occlusion. ``ensure_towns()`` materialises the
committed copy without SUMO; ``generate_towns()`` regenerates it (``pip install -e '.[sumo]'``),
byte-identically for the same seed and SUMO version.
"""

from envs.data.towns.generate import (
    TOWN_NAMES,
    GenerationConfig,
    UnwritableDirectoryError,
    default_root,
    ensure_towns,
    generate_towns,
    verify_towns,
)
from envs.data.towns.sumo_tools import SumoNotAvailableError, TownGenerationError

__all__ = [
    "TOWN_NAMES",
    "GenerationConfig",
    "SumoNotAvailableError",
    "TownGenerationError",
    "UnwritableDirectoryError",
    "default_root",
    "ensure_towns",
    "generate_towns",
    "verify_towns",
]
