"""PNG figures: input, ground truth, reconstruction and anomaly maps, one row per slice.

As the paper's Figures 1-2. matplotlib with the Agg backend (no screen needed).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxvae.io import atomic_path  # noqa: E402


def pick_slices(lesion, n=4):
    """Indices of the n slices with the largest lesion area (spread over the stack)."""
    area = np.asarray(lesion).reshape(len(lesion), -1).sum(1)
    order = np.argsort(-area, kind="stable")
    return sorted(order[:n][area[order[:n]] > 0].tolist()) or list(range(min(n, len(area))))


def map_figure(path, images, lesion, maps, *, recon=None, index=None, overwrite=False,
               title=None):
    """Save a grid: columns input | truth | [reconstruction] | one column per map.

    Args:
      path: output PNG.
      images, lesion: (S, H, W) slices and lesion masks.
      maps: {name: (S, H, W)}; each column is scaled to its own 99.5th percentile.
      recon: optional (S, H, W) reconstructions.
      index: which slices (rows); default `pick_slices(lesion)`.
    """
    index = pick_slices(lesion) if index is None else list(index)
    cols = [("input", images, "gray"), ("ground truth", lesion, "gray")]
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
            ax.imshow(arr[s], cmap=cmap, vmin=0 if vmax is not None else None, vmax=vmax)
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
