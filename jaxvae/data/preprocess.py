"""Pre-processing of one volume into model slices, and the way back (pure numpy, no file I/O).

Volume (X, Y, Z) on the RAS grid -> brain mask -> z-score over brain voxels, background 0,
clip -> axial slices of the brain, minus a margin at each end -> centred pad to a square ->
area-averaged resize to size x size. Masks take the same resize then a 0.5 threshold, so
image and masks stay aligned pixel for pixel. `maps_to_volume` takes (S, size, size) maps back
to (X, Y, Z). Follows Zimmerer et al. 2019 (z-score over non-zero voxels, clip +-1.5,
~20 of 155 slices dropped at each end, 64x64 slices).
"""

from dataclasses import dataclass

import numpy as np

from jaxvae.base.errors import ConfigError, DataError


@dataclass(frozen=True)
class PreprocessParams:
    """How a volume becomes model slices.

    Attributes:
      size: output slices are size x size.
      clip: z-scores are clipped to [-clip, clip]; None disables clipping.
      drop_fraction: fraction of the brain's axial extent dropped at each end. The first and
        last brain slices are mostly skull base / vertex with little brain; the reference code
        dropped 20 of 155 BraTS slices at each end, 0.125 of the extent is about that.
      min_brain_pixels: a kept slice must have at least this many brain pixels in the
        resized size x size brain mask (64 = 1.6% of a 64x64 slice).
      crop: resize the brain's in-plane bounding box (over the kept axial range, padded to
        a square) instead of the whole slice padded to a square, as Zimmerer et al.'s code
        does: the brain fills the slice, whatever the field of view.

    Resampling is fixed, not an option: area averaging to go down (anti-aliased; exact for
    non-integer factors like 240 -> 64), bilinear to come back up. Masks use the same
    operator as images and are thresholded at 0.5.
    """

    size: int = 64
    clip: float | None = 1.5
    drop_fraction: float = 0.125
    min_brain_pixels: int = 64
    crop: bool = False

    def __post_init__(self):
        if self.size < 1 or self.min_brain_pixels < 0:
            raise ConfigError(f"size must be >= 1 and min_brain_pixels >= 0: {self}")
        if not 0 <= self.drop_fraction < 0.5:
            raise ConfigError(f"drop_fraction must be in [0, 0.5): {self.drop_fraction}")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"clip must be > 0 or None: {self.clip}")


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices came from in the (reoriented) volume: what the way back needs.

    Attributes:
      native_shape: (X, Y, Z) of the reoriented volume.
      slices: (S,) int, the axial indices kept, in order.
      pad: (pad_x, pad_y): volume pixel v is pixel v + pad of the square on each in-plane
        axis (> 0: zeros added before the volume; < 0: a crop).
      square: side of the square that is resized: max(X, Y), or the side of the brain's
        bounding box with `PreprocessParams.crop`.
      size: side of the output slices.
    """

    native_shape: tuple[int, int, int]
    slices: tuple[int, ...]
    pad: tuple[int, int]
    square: int
    size: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain integer arrays (for .npz caches, no pickle)."""
        return {"native_shape": np.asarray(self.native_shape, np.int64),
                "slices": np.asarray(self.slices, np.int64),
                "pad": np.asarray(self.pad, np.int64),
                "square": np.asarray(self.square, np.int64),
                "size": np.asarray(self.size, np.int64)}

    @classmethod
    def from_arrays(cls, arrays) -> "SliceGeometry":
        """Inverse of `to_arrays`."""
        return cls(native_shape=tuple(int(v) for v in arrays["native_shape"]),
                   slices=tuple(int(v) for v in arrays["slices"]),
                   pad=tuple(int(v) for v in arrays["pad"]),
                   square=int(arrays["square"]), size=int(arrays["size"]))


def _where(name) -> str:
    return f"{name}: " if name else ""


def brain_mask(volume: np.ndarray, mask: np.ndarray | None = None, *, name=None) -> np.ndarray:
    """Brain voxels of a skull-stripped volume: everything that is not the background value.

    The background is not always 0 (some datasets store it as the volume minimum), so it is
    detected as the value that fills most of the volume's border (its six faces).

    Args:
      volume: (X, Y, Z) intensities.
      mask: optional (X, Y, Z) brain mask from a file; used as given when present.
      name: file name for error messages.

    Returns:
      (X, Y, Z) bool.

    Raises:
      DataError: no clear background (not skull-stripped?), mask shape mismatch, empty brain.
    """
    if mask is not None:
        brain = np.asarray(mask, dtype=bool)
        if brain.shape != volume.shape:
            raise DataError(f"{_where(name)}brain mask shape {brain.shape} != "
                            f"image shape {volume.shape}")
    else:
        border = np.concatenate([volume[[0, -1]].ravel(), volume[:, [0, -1]].ravel(),
                                 volume[:, :, [0, -1]].ravel()])
        values, counts = np.unique(border, return_counts=True)
        top = np.argmax(counts)
        # a skull-stripped volume has one background value on (nearly) all of its border;
        # a noisy border means the head is still there and "not background" is not the brain
        if counts[top] < 0.5 * border.size:
            raise DataError(f"{_where(name)}no constant background on the volume border "
                            f"(most common value covers {counts[top] / border.size:.0%}); "
                            "is it skull-stripped? Supply a brain mask file")
        brain = volume != values[top]
    if not brain.any():
        raise DataError(f"{_where(name)}empty brain mask (no voxel differs from the background)")
    return brain


def normalise(volume: np.ndarray, brain: np.ndarray, clip: float | None = 1.5, *,
              name=None) -> np.ndarray:
    """Z-score over brain voxels, background set to 0, then clip to [-clip, clip].

    Args:
      volume: (X, Y, Z) intensities.
      brain: (X, Y, Z) bool.
      clip: clip bound, None for no clipping.
      name: file name for error messages.

    Returns:
      (X, Y, Z) float32.
    """
    values = volume[brain].astype(np.float64)
    mean, std = values.mean(), values.std()
    if std == 0:
        raise DataError(f"{_where(name)}constant intensity inside the brain ({mean:g})")
    out = np.zeros(volume.shape, np.float32)
    out[brain] = (values - mean) / std
    if clip is not None:
        np.clip(out, -clip, clip, out=out)
    return out


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Area-averaging resampling matrix: out = A @ x averages x over each output pixel.

    Written by hand because, as a matrix, it is exact for non-integer factors (240 -> 64),
    resizes all slices at once as two matrix products (A @ x @ B.T), and its rows sum to 1, so
    images stay in range and masks resampled with it can be thresholded at 0.5.

    Args:
      n_in: input length.
      n_out: output length.

    Returns:
      (n_out, n_in) float64; A[i, j] = overlap of input pixel j with output pixel i,
      divided by the output pixel's width.
    """
    edges = np.linspace(0.0, n_in, n_out + 1)
    j = np.arange(n_in)
    overlap = (np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)).clip(0)
    return overlap / (n_in / n_out)


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear interpolation matrix with pixel centres aligned (align_corners=False).

    Uses the same geometry as `area_matrix` (output pixel i is centred on input coordinate
    (i + 0.5) * n_in / n_out - 0.5), so going down with one and up with the other keeps
    structures in place. Edges are clamped.

    Returns:
      (n_out, n_in) float64 with rows summing to 1.
    """
    c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = c - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m


def _window(mat: np.ndarray, offset: int, length: int) -> np.ndarray:
    """The columns of `mat` (one per pixel of the square) for `length` volume pixels, volume
    pixel v being square pixel v + offset; zero columns for pixels outside the square."""
    out = np.zeros((mat.shape[0], length))
    v = np.arange(length)
    inside = (v + offset >= 0) & (v + offset < mat.shape[1])
    out[:, v[inside]] = mat[:, v[inside] + offset]
    return out


def _down_matrices(shape_xy, size, box=None):
    """Per-axis area matrices from the native in-plane grid to the size x size grid.

    The square is the whole slice centred in max(X, Y), or with `box` ((x0, x1), (y0, y1),
    inclusive) that box centred in a square of its longer side. The padding (and the crop)
    is folded in: only the columns of the square's matrix that fall on volume pixels are
    kept, the padded ones would multiply zeros.
    """
    if box is None:
        box = [(0, s - 1) for s in shape_xy]
    n = max(hi - lo + 1 for lo, hi in box)
    pads = [(n - (hi - lo + 1)) // 2 - lo for lo, hi in box]
    mats = [_window(area_matrix(n, size), p, s) for p, s in zip(pads, shape_xy, strict=True)]
    return mats, pads, n


def _downsample(volume: np.ndarray, zs: np.ndarray, ax: np.ndarray,
                ay: np.ndarray) -> np.ndarray:
    """Axial slices zs of (X, Y, Z) -> (S, size, size): out[s] = ax @ volume[:, :, z_s] @ ay.T."""
    # Two large matrix products over all slices rather than 2*S small ones: several times
    # faster when OpenBLAS threads share busy cores.
    stack = np.moveaxis(volume[:, :, zs], -1, 0).astype(np.float64)  # (S, X, Y)
    n, x, y = stack.shape
    t = (stack.reshape(n * x, y) @ ay.T).reshape(n, x, -1)  # (S, X, size)
    t = ax @ t.transpose(1, 0, 2).reshape(x, -1)  # (size, S * size)
    return t.reshape(len(ax), n, -1).transpose(1, 0, 2)


def preprocess_volume(volume_data: np.ndarray, params: PreprocessParams = PreprocessParams(),
                      mask: np.ndarray | None = None, lesion: np.ndarray | None = None, *,
                      name=None):
    """Turn one reoriented volume into normalised size x size axial brain slices.

    Several co-registered sequences of one case (channels, last axis) share one brain mask:
    the mask file's, else the first sequence's brain (`brain_mask` of channel 0), so every
    channel has the same brain and the same kept slices; each channel is then normalised on
    its own over that brain (z-score, background 0, clip), as one volume is.

    Args:
      volume_data: (X, Y, Z) intensities, last axis axial (`Volume.data`), or (X, Y, Z, C)
        for C co-registered sequences.
      params: `PreprocessParams`.
      mask: optional (X, Y, Z) bool brain mask; detected from the background when None.
      lesion: optional (X, Y, Z) bool lesion mask (e.g. seg > 0).
      name: file name for error messages (with channels: one name per channel, or one).

    Returns:
      images (S, size, size) float32 ((S, size, size, C) for a 4D input), brain
      (S, size, size) bool, lesion (S, size, size) bool or None, and the `SliceGeometry`
      for `maps_to_volume`.

    Raises:
      DataError: bad mask shapes, empty brain, constant brain, no slice left to keep.
    """
    volume_data = np.asarray(volume_data)
    channels = volume_data.ndim == 4
    stack = np.moveaxis(volume_data, -1, 0) if channels else volume_data[None]
    names = list(name) if channels and isinstance(name, list | tuple) else [name] * len(stack)
    name = names[0]
    if volume_data.ndim not in (3, 4) or len(names) != len(stack):
        raise DataError(f"{_where(name)}expected a 3D volume (or 4D: sequences as channels, "
                        f"one name each), got shape {volume_data.shape}")
    if lesion is not None and np.shape(lesion) != stack.shape[1:]:
        raise DataError(f"{_where(name)}lesion mask shape {np.shape(lesion)} != "
                        f"image shape {stack.shape[1:]}")
    brain = brain_mask(stack[0], mask, name=name)
    normalised = [normalise(v, brain, params.clip, name=n)
                  for v, n in zip(stack, names, strict=True)]

    # axial extent of the brain, minus a margin at each end
    z_brain = np.flatnonzero(brain.any(axis=(0, 1)))
    z0, z1 = z_brain[0], z_brain[-1]
    drop = int(params.drop_fraction * (z1 - z0 + 1))
    zs = np.arange(z0 + drop, z1 - drop + 1)

    box = None
    if params.crop:  # the brain's in-plane extent over the kept axial range
        extent = [np.flatnonzero(brain[:, :, zs].any(axis=(a, 2))) for a in (1, 0)]
        box = [(int(e[0]), int(e[-1])) for e in extent]
    (ax, ay), pads, square = _down_matrices(stack.shape[1:3], params.size, box)
    brain_small = _downsample(brain, zs, ax, ay) >= 0.5
    keep = brain_small.sum(axis=(1, 2)) >= params.min_brain_pixels
    if not keep.any():
        raise DataError(f"{_where(name)}no axial slice has {params.min_brain_pixels} brain pixels "
                        f"at {params.size}x{params.size}")
    zs, brain_small = zs[keep], brain_small[keep]
    images = np.stack([_downsample(v, zs, ax, ay).astype(np.float32) for v in normalised],
                      axis=-1 if channels else 0)
    images = images if channels else images[0]
    lesion_small = None
    if lesion is not None:
        lesion_small = _downsample(np.asarray(lesion, bool), zs, ax, ay) >= 0.5
    geometry = SliceGeometry(native_shape=tuple(int(s) for s in stack.shape[1:]),
                             slices=tuple(int(z) for z in zs), pad=tuple(pads), square=square,
                             size=params.size)
    return images, brain_small, lesion_small, geometry


def maps_to_volume(maps: np.ndarray, geometry: SliceGeometry,
                   brain_native: np.ndarray | None = None) -> np.ndarray:
    """Put (S, size, size) maps back on the reoriented volume grid.

    Bilinear upsampling to the padded square, padding cropped, slices put back at their
    axial index; dropped slices are 0, and so is everything outside `brain_native` if given.
    Then `Volume.to_native` and `save_volume` give a NIfTI on the input's grid and affine.

    Args:
      maps: (S, size, size) one map per kept slice, in the order of `geometry.slices`.
      geometry: from `preprocess_volume`.
      brain_native: optional (X, Y, Z) bool brain mask on the reoriented grid.

    Returns:
      (X, Y, Z) float32.
    """
    maps = np.asarray(maps)
    expected = (len(geometry.slices), geometry.size, geometry.size)
    if maps.shape != expected:
        raise ValueError(f"maps shape {maps.shape} != {expected} from the geometry")
    shape = geometry.native_shape
    # up to the square, then keep only the rows that land on real (unpadded) pixels
    up = linear_matrix(geometry.size, geometry.square)
    px, py = geometry.pad
    bx, by = _window(up.T, px, shape[0]).T, _window(up.T, py, shape[1]).T
    out = np.zeros(shape, np.float32)
    n = len(maps)
    t = (maps.reshape(n * geometry.size, -1) @ by.T).reshape(n, geometry.size, -1)  # (S, size, Y)
    t = bx @ t.transpose(1, 0, 2).reshape(geometry.size, -1)  # (X, S * Y), one product each
    out[:, :, list(geometry.slices)] = t.reshape(shape[0], n, shape[1]).transpose(0, 2, 1)
    if brain_native is not None:
        brain_native = np.asarray(brain_native, bool)
        if brain_native.shape != shape:
            raise ValueError(f"brain_native shape {brain_native.shape} != {shape}")
        out[~brain_native] = 0
    return out
