"""Camera frame -> model input, exactly as the official VPP data pipeline does it:
centre crop to a square, resize to the preset's size, scale to [-1, 1], channels first.

numpy + OpenCV only, so cameras, replay, training and export calibration share it.
"""

from __future__ import annotations

import cv2
import numpy as np

_SOURCE_SIZES: set[tuple[int, int]] = set()  # (height, width) of every image prepare_frame took since the reset


def source_sizes(reset: bool = False) -> set[tuple[int, int]]:
    """The distinct (height, width) of the camera images :func:`prepare_frame` has taken
    (so a run can say once that its frames were cropped and resized); ``reset`` empties it."""
    seen = set(_SOURCE_SIZES)
    if reset:
        _SOURCE_SIZES.clear()
    return seen


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Crop the longer side of an [H, W, C] image to a centred square."""
    h, w = image.shape[:2]
    if h > w:
        top = (h - w) // 2
        return image[top: top + w]
    if w > h:
        left = (w - h) // 2
        return image[:, left: left + h]
    return image


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a square image; area filtering when shrinking (anti-aliased), bilinear when growing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def prepare_frame(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 [H, W, 3] camera image -> uint8 [size, size, 3]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    _SOURCE_SIZES.add(image.shape[:2])  # one set insert per frame (atomic under the GIL)
    return np.ascontiguousarray(resize_square(center_crop_square(image), size))


def to_model_input(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]."""
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    x = frames.astype(np.float32) * (2.0 / 255.0) - 1.0
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
