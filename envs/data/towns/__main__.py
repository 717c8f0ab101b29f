"""``python -m envs.data.towns [--out DIR] [--seed N] [--plain] [--town NAME ...]``: regenerate the dataset.

Default: the committed packed assets in ``envs/data/towns/assets`` (needs ``pip install -e '.[sumo]'``).
"""

from __future__ import annotations

import argparse
import json

from envs.data.towns.generate import ASSETS_DIR, TOWN_NAMES, generate_towns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m envs.data.towns", description=__doc__)
    parser.add_argument("--out", default=str(ASSETS_DIR), help="output directory (default: the committed assets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="write the uncompressed INTERACTION layout")
    parser.add_argument("--town", action="append", choices=TOWN_NAMES, help="only this town (repeatable)")
    args = parser.parse_args(argv)
    manifest = generate_towns(args.out, args.seed, towns=args.town, compress=not args.plain, progress=True)
    print(json.dumps({k: manifest[k] for k in ("total_cases", "mean_agents_per_case")}, indent=2))


if __name__ == "__main__":
    main()
