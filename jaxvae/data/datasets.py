"""Cases on disk -> arrays of model slices, with a content-keyed cache; datasets by name.

Two layouts: BraTS (`<ID>/<ID>_<modality>.nii.gz` plus `<ID>/<ID>_seg.nii.gz`, any BraTS
2015-2023 naming) and a flat folder of healthy volumes with optional `_mask` /
`_brainmask` brain masks next to them. Several co-registered sequences of the BraTS layout
("flair,t2") become the image channels, in the order given (jaxvae.data.sequences).
"""

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxvae.base.errors import ConfigError, DataError
from jaxvae.base.io import atomic_path, confined
from jaxvae.data import nifti, phantom
from jaxvae.data.preprocess import PreprocessParams, SliceGeometry, preprocess_volume
from jaxvae.data.sequences import check_modality as check_modality  # re-exported
from jaxvae.data.sequences import modality_aliases, modality_text, parse_modalities
from jaxvae.data.sequences import modality_of as modality_of
from jaxvae.data.sequences import same_modality as same_modality
from jaxvae.data.slices import SliceSet as SliceSet

_MASK_SUFFIXES = ("_brainmask", "_mask")
# Bump when the cached arrays change meaning, so old caches are not reused.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Case:
    """One subject: an image, and optionally its lesion segmentation and brain mask.

    Attributes:
      image_path: the (first) sequence's image.
      image_paths: every sequence's image, in channel order (default: `(image_path,)`).
      sequences: their names ("flair", "t2"; empty where unknown: plain volumes).
    """

    case_id: str
    image_path: Path
    seg_path: Path | None = None
    mask_path: Path | None = None
    image_paths: tuple[Path, ...] = ()
    sequences: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "image_paths", tuple(self.image_paths) or (self.image_path,))
        object.__setattr__(self, "sequences", tuple(self.sequences))
        if self.image_paths[0] != self.image_path or len(self.sequences) not in (
                0, len(self.image_paths)):
            raise ValueError(f"case {self.case_id}: image_paths {self.image_paths} must start "
                             f"with image_path {self.image_path}, one per sequence "
                             f"{self.sequences}")


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))
                  and not p.name.startswith("."))


def _match(folder: Path, files: list[Path], names: tuple[str, ...], what: str) -> Path | None:
    """The one file whose stem ends in _<name> or -<name> (2023 uses '-'), or None."""
    hits = [p for p in files
            if any(nifti.volume_stem(p).lower().endswith((f"_{n}", f"-{n}")) for n in names)]
    if len(hits) > 1:
        raise DataError(f"{folder}: several {what} files: {', '.join(p.name for p in hits)}")
    return hits[0] if hits else None


def _brats_case(folder: Path, asked: tuple[str, ...], files: list[Path]) -> Case:
    images = []
    for seq in asked:
        names = modality_aliases(seq)
        image = _match(folder, files, names, seq)
        if image is None:
            listing = ", ".join(p.name for p in files) or "no NIfTI files"
            raise DataError(f"{folder}: no {seq} image (looked for names ending in "
                            f"{' or '.join('_' + n for n in names)} + .nii/.nii.gz); "
                            f"the folder holds: {listing}")
        images.append(image)
    return Case(case_id=folder.name, image_path=images[0], image_paths=tuple(images),
                sequences=parse_modalities(asked),
                seg_path=_match(folder, files, ("seg",), "segmentation"),
                mask_path=_match(folder, files, tuple(s[1:] for s in _MASK_SUFFIXES), "mask"))


def find_brats_cases(root, modality) -> list[Case]:
    """Find the cases of a BraTS-layout dataset.

    Args:
      root: folder of case folders `<ID>/<ID>_<modality>.nii[.gz]` (+ `<ID>_seg`), or one
        case folder itself.
      modality: t1, t1ce, t2 or flair, or their BraTS 2023 names t1n, t1c, t2w, t2f
        (case-insensitive); several, comma-separated or as a sequence ("flair,t2"), for
        the image channels (`sequences.parse_modalities`).

    Returns:
      Cases sorted by ID, with every sequence's image (`image_paths`), `seg_path` (and
      `mask_path`) where present.

    Raises:
      ConfigError: an unknown or repeated sequence.
      DataError: root missing, no case found, or a case lacks one of the sequences (the
        message names the case folder and the sequence).
    """
    sequences = parse_modalities(modality, canonical=False)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    own = _niftis(root)
    if own:  # a single case folder
        return [_brats_case(root, sequences, own)]
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _niftis(folder)
        if files:  # folders without any NIfTI (docs, caches) are not cases
            cases.append(_brats_case(folder, sequences, files))
    if not cases:
        raise DataError(f"{root}: no case folders with NIfTI files (expected <ID>/<ID>_"
                        f"{sequences[0]}.nii.gz)")
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


def _digest(paths, params: PreprocessParams, sequences=()) -> str:
    """Hash of the input files' bytes, the parameters and (C >= 2) the channels' sequences:
    the cache key."""
    h = hashlib.blake2b(digest_size=16)
    seqs = {"sequences": list(sequences)} if len(sequences) > 1 else {}
    h.update(json.dumps({"v": _CACHE_VERSION, **dataclasses.asdict(params), **seqs},
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
    """One case's slices; several sequences stacked as channels, each normalised on its own
    over one brain mask (the mask file's, else the first sequence's: `preprocess_volume`)."""
    volumes = nifti.load_volumes(case.image_paths)  # co-registered, or DataError
    volume = volumes[0]
    seg = nifti.load_seg(case.seg_path, volume) if case.seg_path else None
    mask = nifti.load_seg(case.mask_path, volume) if case.mask_path else None
    data = volume.data if len(volumes) == 1 else np.stack([v.data for v in volumes], -1)
    images, brain, lesion, geometry = preprocess_volume(
        data, params, mask, seg,
        name=case.image_path if len(volumes) == 1 else list(case.image_paths))
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
        cases = tqdm(cases, desc="loading cases", unit="case")
    sets = []
    for case in cases:
        arrays = None
        if cache_dir is not None:
            key = _digest([*case.image_paths, case.seg_path, case.mask_path], params,
                          case.sequences)
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
                             {case.case_id: geometry}, case.sequences))
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
      modality: image modality of a BraTS-layout dataset (t2, flair, t1, t1ce or aliases),
        or several, "flair,t2", for channels (BraTS layout and phantom only: plain volumes
        carry no sequence names to pair them by).

    Raises:
      ConfigError: an unknown or repeated sequence, or several for plain volumes.
      DataError: as `find_brats_cases` / `find_volumes`.
    """
    sequences = parse_modalities(modality)
    recorded = {"modality": modality_text(sequences)}
    if str(data) == "phantom":
        root = phantom_dataset()
        return find_brats_cases(root, modality), {"source": "phantom", "path": str(root),
                                                   **recorded}
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (give a BraTS folder, a folder of "
                        "volumes, a .nii/.nii.gz volume, or 'phantom')")
    single_case = path.is_dir() and any(
        nifti.volume_stem(p).lower().endswith(("_seg", "-seg"))
        for p in _niftis(path))  # one BraTS case folder
    if path.is_dir() and (single_case or any(p.is_dir() for p in path.iterdir())
                          or (path / "dataset.json").exists()):
        return find_brats_cases(path, modality), {"source": "brats", "path": str(path),
                                                   **recorded}
    if len(sequences) > 1:
        raise ConfigError(f"{path}: several sequences ({recorded['modality']}) need the BraTS "
                          "layout, each case a folder <ID>/<ID>_<sequence>.nii.gz holding "
                          "every sequence; a single volume or a folder of plain volumes "
                          "holds one sequence")
    if path.is_file():
        desc = {"source": "volume", "path": str(path)}
        return [Case(case_id=nifti.volume_stem(path), image_path=path)], desc
    return find_volumes(path), {"source": "healthy", "path": str(path)}


def load_dataset(data, modality="t2", *, params=None, progress=False):
    """(SliceSet of every case, description) with the on-disk slice cache.

    Args:
      data, modality: as `find_cases`; with several sequences ("flair,t2") the images are
        (S, H, W, C), channels in that order, each normalised on its own over the brain.
      params: PreprocessParams (None: the defaults, the model's); `size=128` for 128x128.
    """
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
      float32 of the images' shape ((S, H, W), or (S, H, W, C): each channel on its own).
    """
    out = np.zeros(slices.images.shape, np.float32)
    for case in slices.cases:
        rows = np.flatnonzero(slices.case_ids == case)
        brain = slices.brain[rows]
        values = slices.images[rows][brain]  # (n,) or (n, C)
        ranks = [np.searchsorted(np.sort(v), v, side="right")
                 for v in values.reshape(len(values), -1).T]
        part = out[rows]
        part[brain] = np.stack(ranks, -1).reshape(values.shape) / max(len(values), 1)
        out[rows] = part
    return out
