"""MONAI transforms that read one z slice of a tomogram (and of its label volume) lazily.

Data items are ``{"image": path, "label": path, "z": int}`` (labeled) or ``{"image": path, "z": int}``
(unlabeled), as made by ``scripts.train.dataset.slice_items``. Volumes are opened once per process as
memmaps and kept in a small LRU cache, so a data loader worker reads only the slices it needs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scripts.io.volume import Volume, as_float_slice, open_volume
from scripts.train.labels import label_to_target

__all__ = ["LoadSliced", "VolumeCache"]


class VolumeCache:
    """Least-recently-used cache of opened volumes (memmaps for MRC), one per process."""

    def __init__(self, size: int = 8) -> None:
        self.size = max(1, int(size))
        self._volumes: OrderedDict[str, Volume] = OrderedDict()

    def get(self, path: str) -> Volume:
        path = str(path)
        volume = self._volumes.pop(path, None)
        if volume is None:
            # Headers only: a finiteness scan of a whole tomogram per worker would cost minutes.
            volume = open_volume(path, allow_2d=True, check_finite=False)
        self._volumes[path] = volume
        while len(self._volumes) > self.size:
            self._volumes.popitem(last=False)
        return volume

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers reopen files themselves; memmaps are not sent through pickles.
        return {"size": self.size, "_volumes": OrderedDict()}


class LoadSliced(MapTransform):
    """Replace volume paths by slice ``d[z_key]`` of each volume, as (1, H, W) float32 tensors.

    Keys in ``label_keys`` are mapped to the tanh target {-1, +1} and add ``mask_key``: 1 where the
    pixel is annotated, 0 where the label is 255 (the loss and the metrics ignore those pixels).
    ``path_key`` keeps the image path (a str) for per-tomogram metrics.

    Args:
        keys: keys holding volume paths, e.g. ``("image", "label")``.
        label_keys: the subset of ``keys`` that are label volumes.
        z_key: key of the slice index.
        mask_key: output key of the annotation mask (one label key supported).
        path_key: output key for the image path (None to skip).
        cache_size: volumes kept open per process.
        allow_missing_keys: unlabeled items have no "label".
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_keys: Sequence[str] = ("label",),
        z_key: str = "z",
        mask_key: str = "mask",
        path_key: str | None = "image_path",
        cache_size: int = 8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set(label_keys)
        self.z_key = z_key
        self.mask_key = mask_key
        self.path_key = path_key
        self.cache = VolumeCache(cache_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        z = int(d[self.z_key])
        for key in self.key_iterator(d):
            path = str(d[key])
            volume = self.cache.get(path)
            if not 0 <= z < volume.shape[0]:
                raise IndexError(f"{path}: slice z={z} outside 0..{volume.shape[0] - 1}")
            if key in self.label_keys:
                target, mask = label_to_target(volume.data[z], path, z)
                d[key] = torch.from_numpy(target[None])
                d[self.mask_key] = torch.from_numpy(mask[None])
            else:
                if self.path_key is not None and key == self.first_key(d):
                    d[self.path_key] = path
                d[key] = torch.from_numpy(as_float_slice(volume, z)[None])
        return d
