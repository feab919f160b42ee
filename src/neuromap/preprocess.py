"""Preprocessing that records every step so predictions map back to the input grid exactly.

Steps (in order): reorient to RAS, brain mask (given file, else `foreground_mask`: nonzero voxels of any
sequence, or the Otsu head mask for scans that are not skull-stripped), optional N4
bias-field correction (SimpleITK), crop to the mask's bounding box plus a margin, z-score per sequence inside
the mask, optional resampling to a target spacing, optional 2D mode (axial slice range, in-plane resize).
The arrays keep the layout (C, X, Y, Z) in RAS; 2D models read the last axis as the slice axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from neuromap.config import PreprocessConfig
from neuromap.errors import NeuroMapError
from neuromap.io.header_checks import check_voxel_count
from neuromap.io.nifti import Volume


@dataclass(frozen=True)
class Inverse:
    """What `prepare` did, enough to put a prepared-space array back in the input's voxel grid."""

    original_shape: tuple[int, int, int]
    to_ras: np.ndarray  # nibabel orientation transform, file axes -> RAS
    ras_shape: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]  # [start, stop) per RAS axis
    prepared_shape: tuple[int, int, int]
    ras_spacing: tuple[float, float, float]  # input voxel size along the RAS axes

    def ras(self, array: np.ndarray) -> np.ndarray:
        """An array in the input grid, reoriented to RAS at input resolution (for display)."""
        return _apply_ornt(np.asarray(array), self.to_ras)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in self.bbox)

    def to_crop(self, array: np.ndarray, linear: bool = False) -> np.ndarray:
        """Resize (..., X, Y, Z) from prepared space to the crop at input resolution (still RAS, cropped)."""
        return resize(array, self.crop_shape, linear)

    def to_original(self, array: np.ndarray, linear: bool = False) -> np.ndarray:
        """Map (..., X, Y, Z) from prepared space to the input grid; ``linear`` for probabilities,
        nearest for labels. Voxels outside the crop get 0 (background).
        """
        arr = self.to_crop(array, linear)
        lead = arr.shape[:-3]
        full = np.zeros(lead + self.ras_shape, dtype=arr.dtype)
        full[(...,) + tuple(slice(a, b) for a, b in self.bbox)] = arr
        out = _apply_ornt(full, _invert_ornt(self.to_ras))
        assert out.shape[-3:] == self.original_shape
        return out

    def to_prepared(self, array: np.ndarray, linear: bool = False) -> np.ndarray:
        """Forward-map an array in the input grid (e.g. a label map) to prepared space."""
        crop = self.ras(array)[(...,) + tuple(slice(a, b) for a, b in self.bbox)]
        return resize(crop, self.prepared_shape, linear)


@dataclass
class Prepared:
    image: np.ndarray  # (C, X, Y, Z) float32, RAS, cropped, normalised
    seg: np.ndarray | None  # (X, Y, Z) uint8 internal labels, same grid as image
    inverse: Inverse
    spacing: tuple[float, float, float]  # voxel size of the prepared arrays in mm


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt`` (ornt[i] = (new axis of input axis i, flip))."""
    inverse = np.zeros_like(ornt)
    for axis, (new_axis, flip) in enumerate(ornt):
        inverse[int(new_axis)] = (axis, flip)
    return inverse


def _apply_ornt(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply an orientation transform to the last three axes (leading channel axes untouched)."""
    lead = array.ndim - 3
    full = np.concatenate([np.array([[i, 1] for i in range(lead)], dtype=float).reshape(-1, 2), ornt + [lead, 0]])
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, full))


def resize(array: np.ndarray, shape: tuple[int, ...], linear: bool) -> np.ndarray:
    """Resize the last three axes to ``shape`` (trilinear or nearest). A no-op when the shape already fits, which
    is where PyTorch is not imported (1 mm scans with the ONNX engines never import it)."""
    array = np.asarray(array)
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    # PyTorch's interpolation, not SciPy's zoom: the shipped models were trained on exactly these samples
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(array)
    lead = tensor.shape[:-3]
    flat = tensor.reshape((1, -1) + tuple(tensor.shape[-3:]))
    if linear:
        out = F.interpolate(flat.float(), size=tuple(shape), mode="trilinear", align_corners=False)
    else:  # "nearest-exact" keeps the sampling symmetric, so a round trip of a label map is stable
        out = F.interpolate(flat.float(), size=tuple(shape), mode="nearest-exact").to(tensor.dtype)
    return out.reshape(lead + tuple(shape)).numpy()


def brain_bbox(mask: np.ndarray, margin: int) -> tuple[tuple[int, int], ...]:
    if not mask.any():
        raise NeuroMapError("brain mask is empty: every sequence is zero (or, with foreground 'otsu', constant).")
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        bounds.append((max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(bounds)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the histogram cut with the largest between-class variance; foreground is ``> threshold``.

    Written by hand (it matches skimage.filters.threshold_otsu, bin centres) rather than SimpleITK's
    OtsuThresholdImageFilter, which places the cut half a bin higher: on the LGG patients that moves thousands of
    voxels per head mask, and the shipped LGG model was trained with this one. scikit-image is not a dependency.
    """
    if values.min() == values.max():
        return float(values.max())  # a single value has no split: nothing lies above it
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    # The minimum falls in the first bin and the maximum in the last, so neither class is ever empty here.
    low = np.cumsum(hist)[:-1].astype(np.float64)
    low_sum = np.cumsum(hist * centres)[:-1]
    high = values.size - low
    between = low * high * (low_sum / low - ((hist * centres).sum() - low_sum) / high) ** 2
    return float(centres[int(np.argmax(between))])


def foreground_mask(image: np.ndarray, method: str) -> np.ndarray:
    """Voxels that count as brain for cropping and z-scoring, from (C, X, Y, Z) in RAS.

    "nonzero": any sequence nonzero, exact for skull-stripped scans with a zero background (BraTS). "otsu": for
    scans with skull and a noisy, nonzero background (LGG kaggle_3m), where "nonzero" covers nearly the whole
    field of view and lets noise into the z-score: the largest connected region above Otsu's threshold of the
    mean sequence, with dark enclosed regions (ventricles, CSF) filled per axial slice.
    """
    if method == "nonzero":
        return np.any(image != 0, axis=0)
    mean = image.mean(axis=0)
    mask = mean > otsu_threshold(mean)
    components, n = ndimage.label(mask)
    if n > 1:
        mask = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    return np.stack([ndimage.binary_fill_holes(mask[..., z]) for z in range(mask.shape[-1])], axis=-1)


def n4_correct(channel: np.ndarray, mask: np.ndarray, shrink: int = 4) -> np.ndarray:
    """N4 bias-field correction (SimpleITK), fitted on a shrunken copy for speed, applied at full res."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(channel.astype(np.float32)))
    mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    small = sitk.Shrink(image, [shrink] * 3)
    small_mask = sitk.Shrink(mask_img, [shrink] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([25, 25, 25])
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return (channel / np.exp(sitk.GetArrayFromImage(log_field))).astype(np.float32)


def zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel z-score from voxels inside the mask; outside the mask set to 0."""
    out = np.zeros_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        values = channel[mask]
        std = float(values.std())
        out[c][mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def prepare(volume: Volume, cfg: PreprocessConfig) -> Prepared:
    """Run the configured steps on a loaded volume; see the module docstring for the order."""
    missing = [m for m in cfg.modalities if m not in volume.modalities]
    if missing:
        raise NeuroMapError(f"case '{volume.case.case_id}': the model needs {missing}, loaded {volume.modalities}.")
    image = volume.image[[volume.modalities.index(m) for m in cfg.modalities]]
    to_ras = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(volume.affine), nib.orientations.axcodes2ornt(("R", "A", "S"))
    )
    image = _apply_ornt(image, to_ras)
    seg = _apply_ornt(volume.seg, to_ras) if volume.seg is not None else None
    if volume.brain_mask is not None:
        mask = _apply_ornt(volume.brain_mask, to_ras)
    else:
        mask = foreground_mask(image, cfg.foreground)
    ras_spacing = [0.0, 0.0, 0.0]
    for file_axis, (ras_axis, _flip) in enumerate(to_ras):
        ras_spacing[int(ras_axis)] = volume.spacing[file_axis]
    ras_shape = tuple(image.shape[-3:])
    bbox = list(brain_bbox(mask, cfg.crop_margin))
    if cfg.mode == "2d" and cfg.slice_range is not None:
        start, stop = cfg.slice_range  # 0 <= start < stop: checked by PreprocessConfig
        if stop > image.shape[-1]:
            raise NeuroMapError(
                f"case '{volume.case.case_id}': slice_range {list(cfg.slice_range)} ends after the last axial slice: "
                f"the volume has {image.shape[-1]} (slices 0..{image.shape[-1] - 1}). Fix: STOP <= {image.shape[-1]}."
            )
        bbox[2] = (start, stop)
    bbox = tuple(bbox)
    crop = (...,) + tuple(slice(a, b) for a, b in bbox)
    image, mask = image[crop], mask[crop]
    seg = seg[crop] if seg is not None else None
    if cfg.n4:
        image = np.stack([n4_correct(ch, mask) for ch in image])
    if cfg.normalize:
        image = zscore(image, mask)
    crop_shape = image.shape[-3:]
    if cfg.mode == "2d" and cfg.slice_size is not None:
        target = (*cfg.slice_size, crop_shape[2])
    elif cfg.spacing is not None:
        target = tuple(max(1, round(n * s / t)) for n, s, t in zip(crop_shape, ras_spacing, cfg.spacing, strict=True))
        check_voxel_count(target, f"case '{volume.case.case_id}': resampling its {'x'.join(map(str, crop_shape))} "
                          f"brain crop to {cfg.spacing} mm voxels gives {'x'.join(map(str, target))}",
                          "Fix: choose a coarser spacing.")
    else:
        target = crop_shape
    image = resize(image, target, linear=True).astype(np.float32)
    seg = resize(seg, target, linear=False) if seg is not None else None
    spacing = tuple(s * n / t for s, n, t in zip(ras_spacing, crop_shape, target, strict=True))
    inverse = Inverse(
        original_shape=tuple(volume.image.shape[-3:]), to_ras=to_ras, ras_shape=ras_shape, bbox=bbox,
        prepared_shape=tuple(target), ras_spacing=tuple(ras_spacing),
    )
    return Prepared(image=image, seg=seg, inverse=inverse, spacing=spacing)
