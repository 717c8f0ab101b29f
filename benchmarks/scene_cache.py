"""Scene-cache figures: cold build time, warm open time, warm per-scene load time, disk size. Prints JSON.

    python benchmarks/scene_cache.py [--dataset towns] [--splits train val test] [--data-dir DIR]

The cold build runs in a fresh temporary cache (trajdata reads the raw files, we convert and write npz);
the warm numbers reopen that cache and load every scene of each split.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import data_parser  # benchmarks/common.py (the script's folder is on sys.path)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = data_parser(__doc__, split=False)
    parser.add_argument("--case-length", type=int, default=None)
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    args = parser.parse_args()

    t0 = time.perf_counter()
    from envs.data import open_dataset

    import_s = time.perf_counter() - t0
    result: dict = {"dataset": args.dataset, "machine": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores", "import_s": round(import_s, 3), "splits": {}}
    with tempfile.TemporaryDirectory() as cache_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for split in args.splits:
            start = time.perf_counter()
            ds = open_dataset(args.dataset, split, data_dir=args.data_dir, cache_dir=cache_dir,
                              case_length=args.case_length)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            ds = open_dataset(args.dataset, split, data_dir=args.data_dir, cache_dir=cache_dir,
                              case_length=args.case_length)
            warm_open = time.perf_counter() - start
            ds.map(ds[0].map_id)  # maps load once per dataset object; time scenes alone below
            times = []
            for i in range(len(ds)):
                start = time.perf_counter()
                ds[i]
                times.append(time.perf_counter() - start)
            times_ms = np.array(times) * 1e3
            result["splits"][split] = {
                "scenes": len(ds), "cold_build_s": round(cold, 2), "warm_open_s": round(warm_open, 4),
                "warm_load_ms_mean": round(float(times_ms.mean()), 3),
                "warm_load_ms_p50": round(float(np.percentile(times_ms, 50)), 3),
                "warm_load_ms_p95": round(float(np.percentile(times_ms, 95)), 3),
            }
        root = next(Path(cache_dir).glob(f"{args.dataset}-*"))
        result["cache_disk_mb"] = round(_dir_size(root) / 2**20, 2)
        result["source_disk_mb"] = round(_dir_size(Path(ds._cache.data_dir)) / 2**20, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
