"""The paper's face pipeline: OpenCV's frontal-face Haar cascade, one square crop (with a margin) per face found.

The cascade is the one that ships inside opencv-python-headless (cv2.data.haarcascades), so nothing is downloaded.
"""

from __future__ import annotations

import cv2
import numpy as np

CASCADE = "haarcascade_frontalface_default.xml"
# Detection runs on a copy scaled so that the smallest face wanted is this many pixels: the cascade's window is
# 24 px, and detection time grows with the pixel count, so finding 128 px faces at full size is wasted work.
_DETECT_SIDE = 48


class FaceCropper:
    """Finds faces of at least min_face pixels and gives square crop boxes around them."""

    def __init__(self, min_face: int = 64, margin: float = 0.25):
        path = cv2.data.haarcascades + CASCADE
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"cannot load OpenCV's face cascade {path} (opencv-python-headless 5 dropped it)")
        self.min_face, self.margin = min_face, margin
        cv2.setNumThreads(1)  # the shard tool's worker processes are the parallelism

    def detect(self, arr: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (x, y, w, h) in arr's pixels, sorted so the order never depends on the detector's."""
        grey = arr[:, :, 0] if arr.shape[2] == 1 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, _DETECT_SIDE / self.min_face)
        if scale < 1.0:
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        smallest = max(1, round(self.min_face * scale))
        found = self.cascade.detectMultiScale(cv2.equalizeHist(grey), scaleFactor=1.1, minNeighbors=5,
                                              minSize=(smallest, smallest))
        return sorted(tuple(int(round(v / scale)) for v in box) for box in found)

    def crop_box(self, face: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int]:
        """A square (left, top, side) centred on the face, margin times its size wider on each side, inside the image."""
        x, y, w, h = face
        side = min(round(max(w, h) * (1 + 2 * self.margin)), height, width)
        left = min(max(0, round(x + w / 2 - side / 2)), width - side)
        top = min(max(0, round(y + h / 2 - side / 2)), height - side)
        return left, top, side
