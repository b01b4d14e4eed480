"""PNG figures: input, ground truth, reconstruction and anomaly maps, one row per slice.

As the paper's Figures 1-2. matplotlib with the Agg backend (no screen needed).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxvae.io import atomic_path  # noqa: E402


def pick_slices(lesion, n=4, case_ids=None):
    """Indices of n slices with large lesions; with case_ids, the largest of n different cases."""
    area = np.asarray(lesion).reshape(len(lesion), -1).sum(1)
    order = [i for i in np.argsort(-area, kind="stable") if area[i] > 0]
    if case_ids is not None:
        first = {}
        for i in order:
            first.setdefault(case_ids[i], i)
        order = list(first.values())
    return sorted(int(i) for i in order[:n]) or list(range(min(n, len(area))))


def map_figure(path, images, lesion, maps, *, recon=None, index=None, case_ids=None,
               overwrite=False, title=None):
    """Save a grid: columns input | truth | [reconstruction] | one column per map.

    Args:
      path: output PNG.
      images, lesion: (S, H, W) slices and lesion masks (lesion None: no truth column).
      maps: {name: (S, H, W)}; each column is scaled to its own 99.5th percentile.
      recon: optional (S, H, W) reconstructions.
      index: which slices (rows); default `pick_slices(lesion, case_ids=case_ids)`.
      case_ids: (S,) case of each slice, to show different cases.
    """
    if index is None:
        index = pick_slices(lesion, case_ids=case_ids)
    cols = [("input", images, "gray")]
    if lesion is not None:
        cols.append(("ground truth", lesion, "gray"))
    if recon is not None:
        cols.append(("reconstruction", recon, "gray"))
    cols += [(name, m, "inferno") for name, m in maps.items()]
    fig, axes = plt.subplots(len(index), len(cols), squeeze=False,
                             figsize=(1.6 * len(cols), 1.6 * len(index) + (0.3 if title else 0)))
    for c, (name, arr, cmap) in enumerate(cols):
        arr = np.asarray(arr, np.float32)
        vmax = np.percentile(arr[index], 99.5) if cmap == "inferno" else None
        for r, s in enumerate(index):
            ax = axes[r, c]
            # slices are (R-L, P-A) arrays: transpose so anterior is up, as viewers show them
            ax.imshow(arr[s].T, cmap=cmap, origin="lower", vmin=0 if vmax is not None else None,
                      vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
