"""`SliceSet`: the model-ready slices of many cases, with where each slice came from."""

from dataclasses import dataclass, field

import numpy as np

from jaxvae.data.preprocess import SliceGeometry


def with_channels(images):
    """(N, H, W, C) images from (N, H, W) ones (C = 1) or (N, H, W, C) ones, numpy or jax: the
    one place where a stack of one sequence gets its channel axis (inside the library images
    are (N, H, W, C); a SliceSet of one sequence stores (S, H, W))."""
    return images[..., None] if images.ndim == 3 else images


@dataclass
class SliceSet:
    """Model-ready slices of many cases, with where each came from.

    Attributes:
      images: (S, H, W) float32 for one sequence, (S, H, W, C) for C >= 2 sequences (the
        channels in the order of `sequences`).
      brain: (S, H, W) bool brain mask (one for all channels).
      lesion: (S, H, W) bool lesion mask (all False for healthy data).
      case_ids: (S,) str, the case of each slice.
      slice_index: (S,) int32, its axial index in the reoriented volume.
      geometries: case ID -> `SliceGeometry`, for `maps_to_volume`.
      sequences: the sequence of each channel ("flair", "t2"); empty where unknown.
    """

    images: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray
    case_ids: np.ndarray
    slice_index: np.ndarray
    geometries: dict[str, SliceGeometry] = field(default_factory=dict)
    sequences: tuple[str, ...] = ()

    def __post_init__(self):
        self.images = np.asarray(self.images, np.float32)
        self.brain = np.asarray(self.brain, bool)
        self.lesion = np.asarray(self.lesion, bool)
        self.case_ids = np.asarray(self.case_ids, dtype=str)
        self.slice_index = np.asarray(self.slice_index, np.int32)
        self.sequences = tuple(str(s) for s in self.sequences)
        n = len(self.images)
        if (self.images.ndim not in (3, 4) or self.brain.shape != self.images.shape[:3]
                or (self.images.ndim == 4 and self.images.shape[3] < 2)
                or self.lesion.shape != self.brain.shape
                or self.case_ids.shape != (n,) or self.slice_index.shape != (n,)
                or len(self.sequences) not in (0, self.channels)):
            raise ValueError(f"inconsistent shapes: images {self.images.shape} ((S, H, W), or "
                             f"(S, H, W, C >= 2) with C sequences), brain {self.brain.shape}, "
                             f"lesion {self.lesion.shape}, case_ids {self.case_ids.shape}, "
                             f"slice_index {self.slice_index.shape}, sequences {self.sequences}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        """C, the number of sequences (1: `images` is (S, H, W))."""
        return self.images.shape[3] if self.images.ndim == 4 else 1

    def subset(self, index) -> "SliceSet":
        """Slices selected by an integer index array or a (S,) bool mask."""
        index = np.asarray(index)
        case_ids = self.case_ids[index]
        kept = set(case_ids.tolist())
        return SliceSet(self.images[index], self.brain[index], self.lesion[index], case_ids,
                        self.slice_index[index],
                        {c: g for c, g in self.geometries.items() if c in kept}, self.sequences)

    @classmethod
    def concat(cls, sets) -> "SliceSet":
        """All slices of several sets, in order (of the same sequences)."""
        sets = list(sets)
        if not sets:
            raise ValueError("concat needs at least one SliceSet")
        if len({s.sequences for s in sets}) > 1:
            raise ValueError(f"cannot concatenate slices of different sequences: "
                             f"{sorted({s.sequences for s in sets})}")
        return cls(*(np.concatenate([getattr(s, f) for s in sets])
                     for f in ("images", "brain", "lesion", "case_ids", "slice_index")),
                   geometries={c: g for s in sets for c, g in s.geometries.items()},
                   sequences=sets[0].sequences)

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
