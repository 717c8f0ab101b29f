"""The on-screen window of ``render_mode="human"``: shows renderer frames in a pygame window.

Only this module touches a display; ``render/renderer.py`` draws offscreen and works everywhere.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from envs.errors import NoDisplayError

HEADLESS_DRIVERS = ("dummy", "offscreen")


def display_available() -> bool:
    """Whether a window can be opened: SDL is not set to a headless driver, and on Linux an X11 or Wayland
    display is named. (Checked without opening anything; ``HumanWindow`` still reports a failed open.)"""
    driver = os.environ.get("SDL_VIDEODRIVER", "").lower()
    if driver in HEADLESS_DRIVERS:
        return False
    if sys.platform.startswith("linux") and not driver:
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def _no_display_message(detail: str) -> str:
    return (f"render_mode='human' needs a display, and none exists here ({detail}). Use render_mode='rgb_array' "
            f"and write videos with render.video.write_video / record_episode instead.")


def require_display() -> None:
    """Raise ``NoDisplayError`` unless ``display_available()``."""
    if not display_available():
        driver = os.environ.get("SDL_VIDEODRIVER")
        detail = f"SDL_VIDEODRIVER={driver}" if driver else "neither DISPLAY nor WAYLAND_DISPLAY is set"
        raise NoDisplayError(_no_display_message(detail))


class HumanWindow:
    """A pygame window showing frames at up to ``fps`` frames per second."""

    def __init__(self, title: str = "trafficgym", fps: float = 10.0):
        require_display()
        self.title, self.fps = title, fps
        self._screen = None
        self._clock = None

    def show(self, frame: np.ndarray) -> None:
        """Display one ``uint8 (H, W, 3)`` frame (opening the window on first use) and keep the window alive."""
        import pygame

        h, w = frame.shape[:2]
        if self._screen is None or self._screen.get_size() != (w, h):
            try:
                pygame.display.init()
                self._screen = pygame.display.set_mode((w, h))
            except pygame.error as e:
                raise NoDisplayError(_no_display_message(f"SDL could not open a window: {e}")) from e
            pygame.display.set_caption(self.title)
            self._clock = pygame.time.Clock()
        pygame.event.pump()  # keeps the OS from marking the window unresponsive
        pygame.surfarray.blit_array(self._screen, np.ascontiguousarray(frame.transpose(1, 0, 2)))
        pygame.display.flip()
        self._clock.tick(self.fps)

    def close(self) -> None:
        if self._screen is not None:
            import pygame

            pygame.display.quit()
            self._screen = None
