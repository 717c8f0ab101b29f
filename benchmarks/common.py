"""What the benchmark scripts share: the data arguments every data-driven benchmark takes."""

from __future__ import annotations

import argparse


def data_parser(doc: str, split: bool = True) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc`` (the script's docstring) with ``--dataset``
    (default towns), ``--split`` (default val; left out with ``split=False``) and ``--data-dir``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dataset", default="towns")
    if split:
        parser.add_argument("--split", default="val")
    parser.add_argument("--data-dir", default=None)
    return parser
