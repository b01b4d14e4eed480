"""Cases on disk -> arrays of model slices, with a content-keyed cache; datasets by name.

Two layouts: BraTS (`<ID>/<ID>_<modality>.nii.gz` plus `<ID>/<ID>_seg.nii.gz`, any BraTS
2015-2023 naming) and a flat folder of healthy volumes with optional `_mask` /
`_brainmask` brain masks next to them.
"""

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxvae.data import nifti, phantom
from jaxvae.data.preprocess import PreprocessParams, SliceGeometry, preprocess_volume
from jaxvae.errors import ConfigError, DataError
from jaxvae.io import atomic_path, confined

# BraTS renamed its modalities over the years (2023: t1n, t1c, t2w, t2f).
_MODALITY_GROUPS = (("t1", "t1n"), ("t1ce", "t1c", "t1gd"), ("t2", "t2w"), ("flair", "t2f"))
_MASK_SUFFIXES = ("_brainmask", "_mask")
# Bump when the cached arrays change meaning, so old caches are not reused.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Case:
    """One subject: an image, and optionally its lesion segmentation and brain mask."""

    case_id: str
    image_path: Path
    seg_path: Path | None = None
    mask_path: Path | None = None


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))
                  and not p.name.startswith("."))


def _aliases(modality: str) -> tuple[str, ...]:
    m = modality.lower()
    for group in _MODALITY_GROUPS:
        if m in group:
            return group
    return (m,)


def same_modality(a: str, b: str) -> bool:
    """Whether two modality names are the same sequence (BraTS aliases included)."""
    return b.lower() in _aliases(a)


def modality_of(path) -> str | None:
    """The BraTS modality a file's name ends in (`<ID>_flair.nii.gz` -> "flair"), or None."""
    stem = nifti.volume_stem(Path(path)).lower()
    return next((m for group in _MODALITY_GROUPS for m in group
                 if stem.endswith((f"_{m}", f"-{m}"))), None)


def check_modality(path, trained, asked):
    """Refuse an input named as another sequence than the run's, unless `asked` says so.

    Args:
      path: the input volume; trained: the run's modality (None: not checked); asked: the
        user's --modality (None: not given).
    """
    named = modality_of(path)
    if trained is None or named is None or same_modality(named, trained):
        return
    if asked is None or not same_modality(asked, named):
        raise ConfigError(f"{path}: its name says {named}, the run was trained on {trained}; "
                          f"pass --modality {named} to score it anyway")


def _match(folder: Path, files: list[Path], names: tuple[str, ...], what: str) -> Path | None:
    """The one file whose stem ends in _<name> or -<name> (2023 uses '-'), or None."""
    hits = [p for p in files
            if any(nifti.volume_stem(p).lower().endswith((f"_{n}", f"-{n}")) for n in names)]
    if len(hits) > 1:
        raise DataError(f"{folder}: several {what} files: {', '.join(p.name for p in hits)}")
    return hits[0] if hits else None


def _brats_case(folder: Path, modality: str, files: list[Path]) -> Case:
    names = _aliases(modality)
    image = _match(folder, files, names, modality)
    if image is None:
        listing = ", ".join(p.name for p in files) or "no NIfTI files"
        raise DataError(f"{folder}: no {modality} image (looked for names ending in "
                        f"{' or '.join('_' + n for n in names)} + .nii/.nii.gz); "
                        f"the folder holds: {listing}")
    return Case(case_id=folder.name, image_path=image,
                seg_path=_match(folder, files, ("seg",), "segmentation"),
                mask_path=_match(folder, files, tuple(s[1:] for s in _MASK_SUFFIXES), "mask"))


def find_brats_cases(root, modality: str) -> list[Case]:
    """Find the cases of a BraTS-layout dataset.

    Args:
      root: folder of case folders `<ID>/<ID>_<modality>.nii[.gz]` (+ `<ID>_seg`), or one
        case folder itself.
      modality: t1, t1ce, t2 or flair, or their BraTS 2023 names t1n, t1c, t2w, t2f
        (case-insensitive).

    Returns:
      Cases sorted by ID, with `seg_path` (and `mask_path`) where present.

    Raises:
      DataError: root missing, no case found, or a case lacks the modality.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    own = _niftis(root)
    if own:  # a single case folder
        return [_brats_case(root, modality, own)]
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _niftis(folder)
        if files:  # folders without any NIfTI (docs, caches) are not cases
            cases.append(_brats_case(folder, modality, files))
    if not cases:
        raise DataError(f"{root}: no case folders with NIfTI files (expected <ID>/<ID>_"
                        f"{modality}.nii.gz)")
    return sorted(cases, key=lambda c: c.case_id)


def find_volumes(folder) -> list[Case]:
    """Find healthy volumes (any names) in a folder, with optional brain masks beside them.

    Args:
      folder: holds `*.nii` / `*.nii.gz` volumes; `<name>_mask` or `<name>_brainmask`
        next to `<name>` is its brain mask.

    Returns:
      Cases sorted by ID (the file name without extension), no segmentation.

    Raises:
      DataError: folder missing or empty, a mask without its volume, duplicate names.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of volumes not found")
    files = _niftis(folder)
    masks, images = {}, {}
    for p in files:
        stem = nifti.volume_stem(p)
        suffix = next((s for s in _MASK_SUFFIXES if stem.lower().endswith(s)), None)
        target, key = (masks, stem[:-len(suffix)]) if suffix else (images, stem)
        if key in target:
            raise DataError(f"{folder}: two files for '{key}': {target[key].name}, {p.name}")
        target[key] = p
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{folder}: brain masks without a volume: "
                        f"{', '.join(masks[k].name for k in orphans)}")
    if not images:
        raise DataError(f"{folder}: no .nii or .nii.gz volumes")
    return [Case(case_id=k, image_path=images[k], mask_path=masks.get(k))
            for k in sorted(images)]


@dataclass
class SliceSet:
    """Model-ready slices of many cases, with where each came from.

    Attributes:
      images: (S, H, W) float32.
      brain: (S, H, W) bool brain mask.
      lesion: (S, H, W) bool lesion mask (all False for healthy data).
      case_ids: (S,) str, the case of each slice.
      slice_index: (S,) int32, its axial index in the reoriented volume.
      geometries: case ID -> `SliceGeometry`, for `maps_to_volume`.
    """

    images: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray
    case_ids: np.ndarray
    slice_index: np.ndarray
    geometries: dict[str, SliceGeometry] = field(default_factory=dict)

    def __post_init__(self):
        self.images = np.asarray(self.images, np.float32)
        self.brain = np.asarray(self.brain, bool)
        self.lesion = np.asarray(self.lesion, bool)
        self.case_ids = np.asarray(self.case_ids, dtype=str)
        self.slice_index = np.asarray(self.slice_index, np.int32)
        n = len(self.images)
        if (self.images.ndim != 3 or self.brain.shape != self.images.shape
                or self.lesion.shape != self.images.shape
                or self.case_ids.shape != (n,) or self.slice_index.shape != (n,)):
            raise ValueError(f"inconsistent shapes: images {self.images.shape}, brain "
                             f"{self.brain.shape}, lesion {self.lesion.shape}, case_ids "
                             f"{self.case_ids.shape}, slice_index {self.slice_index.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "SliceSet":
        """Slices selected by an integer index array or a (S,) bool mask."""
        index = np.asarray(index)
        case_ids = self.case_ids[index]
        kept = set(case_ids.tolist())
        return SliceSet(self.images[index], self.brain[index], self.lesion[index], case_ids,
                        self.slice_index[index],
                        {c: g for c, g in self.geometries.items() if c in kept})

    @classmethod
    def concat(cls, sets) -> "SliceSet":
        """All slices of several sets, in order."""
        sets = list(sets)
        if not sets:
            raise ValueError("concat needs at least one SliceSet")
        return cls(*(np.concatenate([getattr(s, f) for s in sets])
                     for f in ("images", "brain", "lesion", "case_ids", "slice_index")),
                   geometries={c: g for s in sets for c, g in s.geometries.items()})

    @property
    def cases(self) -> list[str]:
        """Sorted unique case IDs."""
        return sorted(set(self.case_ids.tolist()))

    def for_cases(self, ids) -> "SliceSet":
        """The slices of the given cases."""
        return self.subset(np.isin(self.case_ids, list(ids)))

    def lesion_free(self) -> "SliceSet":
        """Slices without any lesion pixel (the healthy training slices)."""
        return self.subset(~self.lesion.any(axis=(1, 2)))


def _digest(paths, params: PreprocessParams) -> str:
    """Hash of the input files' bytes and the parameters: the cache key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": _CACHE_VERSION, **dataclasses.asdict(params)},
                        sort_keys=True).encode())
    for p in paths:
        h.update(b"-" if p is None else b"+")
        if p is not None:
            try:
                with open(p, "rb") as f:
                    h.update(hashlib.file_digest(f, "blake2b").digest())
            except OSError as e:
                raise DataError(f"{p}: cannot read ({e.strerror})") from e
    return h.hexdigest()


def _load_case(case: Case, params: PreprocessParams) -> dict[str, np.ndarray]:
    volume = nifti.load_volume(case.image_path)
    seg = nifti.load_seg(case.seg_path, volume) if case.seg_path else None
    mask = nifti.load_seg(case.mask_path, volume) if case.mask_path else None
    images, brain, lesion, geometry = preprocess_volume(volume.data, params, mask, seg,
                                                        name=case.image_path)
    if lesion is None:
        lesion = np.zeros_like(brain)
    return {"images": images, "brain": brain, "lesion": lesion,
            **{f"geometry_{k}": v for k, v in geometry.to_arrays().items()}}


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing or damaged: recompute and overwrite


def load_slices(cases, params: PreprocessParams | None = None, *, cache_dir=None,
                progress: bool = False) -> SliceSet:
    """Read, pre-process and concatenate the slices of several cases.

    Args:
      cases: `Case`s (from `find_brats_cases` or `find_volumes`).
      params: `PreprocessParams`; None for the defaults.
      cache_dir: optional folder of per-case .npz caches, keyed by a hash of the input
        files' contents and `params`; a hit reads no NIfTI.
      progress: show a progress bar.

    Returns:
      A `SliceSet` with every case's kept slices, in case order.

    Raises:
      DataError: any unreadable or invalid input (the message names the file).
    """
    params = PreprocessParams() if params is None else params
    cases = list(cases)
    if not cases:
        raise DataError("no cases to load")
    if progress:
        from tqdm import tqdm
        cases = tqdm(cases, desc="loading cases", unit="case")
    sets = []
    for case in cases:
        arrays = None
        if cache_dir is not None:
            key = _digest([case.image_path, case.seg_path, case.mask_path], params)
            cache = confined(cache_dir, f"{case.case_id}-{key}.npz")
            arrays = _read_cache(cache) if cache.is_file() else None
        if arrays is None:
            arrays = _load_case(case, params)
            if cache_dir is not None:
                with atomic_path(cache, overwrite=True) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **arrays)
        geometry = SliceGeometry.from_arrays(
            {k[len("geometry_"):]: v for k, v in arrays.items() if k.startswith("geometry_")})
        n = len(arrays["images"])
        sets.append(SliceSet(arrays["images"], arrays["brain"], arrays["lesion"],
                             np.full(n, case.case_id), np.asarray(geometry.slices),
                             {case.case_id: geometry}))
    return SliceSet.concat(sets)


# ---- datasets by name: the phantom cache, BraTS folders, healthy folders, one volume -------

def cache_root() -> Path:
    """Folder for generated phantom data and pre-processed slice caches."""
    if "JAXVAE_CACHE" in os.environ:
        return Path(os.environ["JAXVAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxvae"


def phantom_dataset(root=None, *, seed=0, n_healthy=16, n_lesion=8) -> Path:
    """The phantom dataset folder, written on first use (dataset.json marks it complete)."""
    root = Path(root) if root else cache_root() / f"phantom-s{seed}-h{n_healthy}-l{n_lesion}"
    if not (root / "dataset.json").is_file():
        phantom.write_brats(root, n_healthy=n_healthy, n_lesion=n_lesion, seed=seed,
                            overwrite=True)
    return root


def find_cases(data, modality="t2"):
    """Resolve a dataset name to (cases, description dict).

    Args:
      data: "phantom", a BraTS-layout folder, a folder of healthy volumes, or one volume.
      modality: image modality of a BraTS-layout dataset (t2, flair, t1, t1ce or aliases).
    """
    if str(data) == "phantom":
        root = phantom_dataset()
        return find_brats_cases(root, modality), {"source": "phantom", "path": str(root),
                                                  "modality": modality}
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (give a BraTS folder, a folder of "
                        "volumes, a .nii/.nii.gz volume, or 'phantom')")
    if path.is_file():
        desc = {"source": "volume", "path": str(path)}
        return [Case(case_id=nifti.volume_stem(path), image_path=path)], desc
    single_case = any(nifti.volume_stem(p).lower().endswith(("_seg", "-seg"))
                      for p in _niftis(path))  # one BraTS case folder
    if single_case or any(p.is_dir() for p in path.iterdir()) \
            or (path / "dataset.json").exists():
        return find_brats_cases(path, modality), {"source": "brats", "path": str(path),
                                                  "modality": modality}
    return find_volumes(path), {"source": "healthy", "path": str(path)}


def load_dataset(data, modality="t2", *, params=None, progress=False):
    """(SliceSet of every case, description) with the on-disk slice cache.

    `params`: PreprocessParams (None: the defaults, the model's)."""
    cases, desc = find_cases(data, modality)
    return load_slices(cases, params, cache_dir=cache_root() / "slices",
                       progress=progress), desc


def equalized(slices: SliceSet) -> np.ndarray:
    """Histogram-equalised images (Meissen et al. 2021's baseline variant), per case.

    Each case's brain pixels are replaced by their empirical CDF over that case's brain
    (rank / count, ties sharing the highest rank), so within a case the order of the
    pixels is unchanged and across cases the intensities become comparable; background
    pixels are 0.

    Returns:
      (S, H, W) float32.
    """
    out = np.zeros(slices.images.shape, np.float32)
    for case in slices.cases:
        rows = np.flatnonzero(slices.case_ids == case)
        brain = slices.brain[rows]
        values = slices.images[rows][brain]
        ordered = np.sort(values)
        part = out[rows]
        part[brain] = np.searchsorted(ordered, values, side="right") / max(values.size, 1)
        out[rows] = part
    return out
