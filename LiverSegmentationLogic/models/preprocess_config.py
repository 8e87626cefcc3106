"""How a model wants its input (the ``preprocessing`` of a task file or model card).

Kept apart from :mod:`inference.preprocessing` so that reading task files and model cards needs no torch
(the inference server's broker and the Slicer panel list tasks before torch is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its input.

    Attributes:
        spacing_xy: in-plane voxel size of the model grid, mm (x, y).
        neighbours: k neighbour slices on each side; the model sees 2k + 1 channels.
        intensity: ``{"method": "percentile", "lower": 0.5, "upper": 99.5}`` (clip to these
            percentiles, then min-max to 0-1; the default, suited to MR) or
            ``{"method": "window", "center": C, "width": W}`` (a fixed window in Hounsfield units,
            suited to CT), optionally with ``"windowed_range": [0, 255]``: an image whose values
            all lie in that range is taken as already windowed by its publisher and mapped 0-1
            as it is (LiTS-derived CT, windowed to about W400 L40).
        multiple: pad the in-plane size up to a multiple of this (the U-Net's total stride).
        channels: input images per case (e.g. 2 for a fat + water Dixon pair), each normalised
            on its own; the model sees channels x (2k + 1) planes.
    """

    spacing_xy: tuple[float, float] = (2.0, 2.0)
    neighbours: int = 1
    intensity: dict = field(default_factory=lambda: {"method": "percentile", "lower": 0.5, "upper": 99.5})
    multiple: int = 16
    channels: int = 1

    def __post_init__(self):
        if len(self.spacing_xy) != 2 or min(self.spacing_xy) <= 0:
            raise ValueError(f"spacing_xy must be two positive numbers, got {self.spacing_xy}")
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {self.neighbours}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        method = self.intensity.get("method")
        if method == "percentile":
            if not 0 <= self.intensity["lower"] < self.intensity["upper"] <= 100:
                raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100: {self.intensity}")
        elif method == "window":
            if self.intensity["width"] <= 0:
                raise ValueError(f"window width must be positive: {self.intensity}")
            windowed = self.intensity.get("windowed_range")
            if windowed is not None and not (len(windowed) == 2 and windowed[0] < windowed[1]):
                raise ValueError(f"windowed_range must be [lower, upper] with lower < upper: {self.intensity}")
        else:
            raise ValueError(f"intensity method must be 'percentile' or 'window', got {method!r}")

    @property
    def in_channels(self) -> int:
        return self.channels * (2 * self.neighbours + 1)

    def to_dict(self) -> dict:
        return {
            "spacing_xy": list(self.spacing_xy),
            "neighbours": self.neighbours,
            "intensity": dict(self.intensity),
            "multiple": self.multiple,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            spacing_xy=tuple(float(s) for s in d["spacing_xy"]),
            neighbours=int(d["neighbours"]),
            intensity=dict(d["intensity"]),
            multiple=int(d.get("multiple", 16)),
            channels=int(d.get("channels", 1)),
        )
