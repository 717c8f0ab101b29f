"""Rendering: ``renderer`` (fast pygame frames of a ``SimState``), ``video`` (mp4/gif, episode and log-replay
videos), ``display`` (the ``render_mode="human"`` window), ``map_figure`` (matplotlib stills for docs).

Submodules are imported on demand, so ``import render.map_figure`` does not pull in pygame."""
