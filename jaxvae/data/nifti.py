"""NIfTI volumes in and out: validated loading, reorientation to RAS, and the way back.

A loaded `Volume` holds its data reoriented so that the last axis is axial (inferior ->
superior), plus the original affine, shape and the orientation transform, so that an array
computed on the reoriented grid (an anomaly map) can be written on the input's own voxel grid
with the input's affine and overlaid on it in any viewer.
"""

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from nibabel.spatialimages import HeaderDataError, SpatialImage

from jaxvae.base.errors import DataError, OutputError
from jaxvae.base.io import atomic_path

# In-plane sizes below this are not brain MRI slices (1x1x100000 is a vector, not a volume);
# sizes above MAX_DIM or MAX_VOXELS (1 GiB as float32; a 0.5 mm whole head is ~0.1 G voxels)
# are header corruption, refused before any voxel is read: reading would exhaust memory.
MIN_INPLANE = 16
MAX_DIM = 2048
MAX_VOXELS = 2**28

_RAS = axcodes2ornt("RAS")
# What nibabel and the decompressor raise for unreadable, empty, truncated or non-NIfTI files.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image on a RAS-reoriented grid, with what is needed to go back to the file's grid.

    Attributes:
      data: (X, Y, Z) float32, axes ordered and flipped to R, A, S (Z is axial, inferior first).
      affine: (4, 4) the file's original voxel -> world (mm) affine.
      shape: the file's original 3D shape.
      ornt: (3, 2) nibabel orientation transform from the file's grid to `data`'s grid.
      path: the file it was read from (None: an in-memory image without a file name).
    """

    data: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]
    ornt: np.ndarray
    path: Path | None

    @property
    def ras_affine(self) -> np.ndarray:
        """(4, 4) voxel -> world affine of the reoriented `data` (same world coordinates)."""
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """Map an array on the reoriented grid back to the file's original voxel grid.

        Args:
          array: (X, Y, Z) on the grid of `data`.

        Returns:
          The same values as an array of shape `self.shape`, aligned with `self.affine`.
        """
        array = np.asarray(array)
        if array.shape != self.data.shape:
            raise ValueError(f"array shape {array.shape} != reoriented shape {self.data.shape}")
        back = ornt_transform(_RAS, io_orientation(self.affine))
        return apply_orientation(array, back)


def source_name(source) -> str:
    """How messages name a volume: its path, or an in-memory image's file name or kind."""
    if isinstance(source, SpatialImage):
        filename = source.get_filename()
        return filename or f"<in-memory {type(source).__name__} {source.shape}>"
    return str(source)


def _read(source, *, volume_index=None) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3D volume from a NIfTI file or an in-memory nibabel NIfTI image, rejecting
    anything that is not a sane image.

    Returns:
      (data (X, Y, Z) float32 on the file's grid, affine (4, 4) float64).
    """
    if isinstance(source, SpatialImage):
        img, path = source, source_name(source)  # every check below applies to it too
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise DataError(f"{path}: not a NIfTI image (a {type(img).__name__}); convert it "
                            "with nibabel.Nifti1Image(img.get_fdata(), img.affine)")
    else:
        path = Path(source)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "file not found"
            raise DataError(f"{path}: {what}")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        try:
            img = nib.load(path)
        except _READ_ERRORS as e:
            raise DataError(f"{path}: not a readable NIfTI file ({e})") from e
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise DataError(f"{path}: not a NIfTI file (nibabel reads it as "
                            f"{type(img).__name__})")

    shape = img.shape
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: {len(shape)}D image {shape}; expected a 3D volume")
    if len(shape) == 4:
        n = shape[3]
        if volume_index is None and n != 1:
            raise DataError(f"{path}: 4D image with {n} volumes {shape}; "
                            f"choose one with volume_index (0..{n - 1}; "
                            "jaxvae score --volume-index)")
        index = 0 if volume_index is None else volume_index
    else:
        n, index = 1, volume_index or 0
    if not 0 <= index < n:
        raise DataError(f"{path}: volume_index {volume_index} out of range (file has {n})")
    if min(shape[:3]) < 1 or max(shape[:3]) > MAX_DIM:
        raise DataError(f"{path}: implausible shape {shape} (a dimension is 0 or > {MAX_DIM})")
    voxels = math.prod(shape[:3])
    if voxels > MAX_VOXELS:
        raise DataError(f"{path}: implausible size {shape}: {voxels:,} voxels per volume "
                        f"(> {MAX_VOXELS:,}); is the header corrupt?")
    kind = img.get_data_dtype().kind
    if kind not in "biuf":
        raise DataError(f"{path}: voxel type {img.get_data_dtype()} is not real-valued")

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: invalid affine (singular or not finite):\n{affine}")
    try:
        proxy = img.dataobj[..., index] if len(shape) == 4 else img.dataobj
        data = np.asarray(proxy, dtype=np.float32)
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read the voxel data, truncated or corrupt ({e})") from e
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
        raise DataError(f"{path}: {bad} of {data.size} voxels are NaN or Inf")
    return data, affine


def _check_inplane(path, data: np.ndarray) -> None:
    if min(data.shape[:2]) < MIN_INPLANE:
        raise DataError(f"{path}: implausible shape {data.shape} after reorientation to RAS "
                        f"(axial slices must be at least {MIN_INPLANE}x{MIN_INPLANE} voxels)")


def load_volume(path, *, volume_index: int | None = None) -> Volume:
    """Load a NIfTI image as float32, reoriented to RAS so that the last axis is axial.

    Args:
      path: a .nii or .nii.gz file holding a 3D image (or 4D with one volume), or an
        in-memory nibabel Nifti1Image / Nifti2Image (checked the same way; the Volume's
        `path` is then its file name, or None).
      volume_index: which volume of a 4D file with several volumes to read.

    Returns:
      A `Volume` with `data` (X, Y, Z) float32 and what `to_native` needs to go back.

    Raises:
      DataError: missing, empty, corrupt or non-NIfTI file, wrong dimensionality, complex or
        non-finite voxels, implausible shape, or a constant (e.g. all-zero) image.
    """
    data, affine = _read(path, volume_index=volume_index)
    name = source_name(path)
    native_shape = data.shape
    ornt = ornt_transform(io_orientation(affine), _RAS)
    data = np.ascontiguousarray(apply_orientation(data, ornt))
    _check_inplane(name, data)
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise DataError(f"{name}: constant image (every voxel is {lo:g}); nothing to analyse")
    if isinstance(path, SpatialImage):
        path = path.get_filename()
    return Volume(data=data, affine=affine, shape=native_shape, ornt=ornt,
                  path=None if path is None else Path(path))


def load_volumes(paths, *, volume_index: int | None = None) -> list[Volume]:
    """Load co-registered volumes (one case's sequences), checked to share one voxel grid.

    Args:
      paths: files or in-memory images, as `load_volume` takes them.
      volume_index: as `load_volume`, for each.

    Returns:
      The `Volume`s in order; their `data` share one reoriented grid (stack them as channels).

    Raises:
      DataError: as `load_volume`, or a volume whose shape or affine differs from the first's
        (the message names both files).
    """
    paths = list(paths)
    volumes = [load_volume(p, volume_index=volume_index) for p in paths]
    first = volumes[0] if volumes else None
    for v, p in zip(volumes[1:], paths[1:], strict=True):
        pair = f"{source_name(p)} vs {source_name(paths[0])}"
        if tuple(v.shape) != tuple(first.shape):
            raise DataError(f"{pair}: shapes {tuple(v.shape)} != {tuple(first.shape)}; the "
                            "sequences of a case must be co-registered (one voxel grid)")
        if not np.allclose(v.affine, first.affine, atol=1e-3):  # as load_seg
            raise DataError(f"{pair}: affines differ, the sequences are not co-registered "
                            f"(resample them onto one grid)\n{v.affine}\n!=\n{first.affine}")
    return volumes


def load_seg(path, reference: Volume) -> np.ndarray:
    """Load a label map (tumour segmentation or brain mask) aligned with `reference`.

    Args:
      path: NIfTI file (or in-memory nibabel NIfTI image) with non-negative integer labels
        (integers stored as floats are fine), the same shape and affine as the file
        `reference` was read from.
      reference: the image volume it belongs to.

    Returns:
      (X, Y, Z) bool on `reference`'s reoriented grid, True where the label is > 0
      (for BraTS: the whole tumour).

    Raises:
      DataError: unreadable file, or a shape/affine/label mismatch (names both files).
    """
    data, affine = _read(path)
    pair = f"{source_name(path)} vs image {reference.path or 'in memory'}"
    if data.shape != tuple(reference.shape):
        raise DataError(f"{pair}: shape {data.shape} != image shape {tuple(reference.shape)}")
    # 1e-3 mm: writers round affines differently, but a real misalignment is far larger
    if not np.allclose(affine, reference.affine, atol=1e-3):
        raise DataError(f"{pair}: affines differ, the label map is not on the image's grid\n"
                        f"{affine}\n!=\n{reference.affine}")
    if data.min() < 0:
        raise DataError(f"{pair}: negative labels (min {data.min():g})")
    if not np.array_equal(data, np.round(data)):
        raise DataError(f"{pair}: labels are not integers (is this a probability map?)")
    return np.ascontiguousarray(apply_orientation(data > 0, reference.ornt))


def volume_stem(path) -> str:
    """File name without .nii / .nii.gz (the prefix of a volume's output files)."""
    name = Path(path).name
    return name[:-7] if name.lower().endswith(".nii.gz") else name.removesuffix(".nii")


def save_volume(path, data_native: np.ndarray, affine: np.ndarray, *,
                overwrite: bool = False, dtype=np.float32) -> Path:
    """Write a 3D NIfTI atomically (a crash never leaves a half-written file): the one
    NIfTI writer of jaxvae (maps, phantom images and label maps).

    Args:
      path: output file ending in .nii or .nii.gz.
      data_native: (X, Y, Z) array on the target grid (e.g. `Volume.to_native(map)`).
      affine: (4, 4) voxel -> world affine of that grid (e.g. `Volume.affine`).
      overwrite: replace an existing file.
      dtype: the stored data type (float32 for maps; the phantom's labels keep theirs).

    Returns:
      The path written.

    Raises:
      OutputError: wrong suffix, bad shapes, file exists without overwrite, or not writable.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise OutputError(f"{path}: a NIfTI output must end in .nii or .nii.gz")
    data = np.asarray(data_native, dtype=dtype)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3 or affine.shape != (4, 4):
        raise OutputError(f"{path}: need a 3D array and a 4x4 affine, "
                          f"got {data.shape} and {affine.shape}")
    img = nib.Nifti1Image(data, affine)
    # set both qform and sform: some viewers read only one of them
    img.set_qform(affine, code="aligned")
    img.set_sform(affine, code="aligned")
    img.header.set_xyzt_units("mm")
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, tmp)
    return path
