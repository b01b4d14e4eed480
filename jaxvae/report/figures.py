"""PNG figures: input, ground truth, reconstruction and anomaly maps, one row per slice.

As the paper's Figures 1-2. matplotlib with the Agg backend (no screen needed).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxvae.base.io import atomic_path  # noqa: E402
from jaxvae.report.results import row_order


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
      images, lesion: (S, H, W) slices and lesion masks (lesion None: no truth column);
        (S, H, W, C) images of C sequences show the first.
      maps: {name: (S, H, W)}; each column is scaled to its own 99.5th percentile.
      recon: optional (S, H, W) reconstructions.
      index: which slices (rows); default `pick_slices(lesion, case_ids=case_ids)`.
      case_ids: (S,) case of each slice, to show different cases.
    """
    if index is None:
        index = pick_slices(lesion, case_ids=case_ids)
    images = np.asarray(images)
    cols = [("input", images[..., 0] if images.ndim == 4 else images, "gray")]
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


def _area(x, y):
    """Trapezoid area under y(x), the points sorted by x (ties keep their order)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return float("nan")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def _flag_all_precision(curves):
    """Precision of flagging every pixel (= prevalence) if some PR curve reaches recall 1."""
    at_one = [np.asarray(c["precision"], np.float64)[np.asarray(c["recall"]) >= 1 - 1e-9]
              for c in curves.values() if len(c.get("recall", ())) and len(c.get("precision", ()))]
    at_one = [p.min() for p in at_one if p.size]
    return min(at_one) if at_one else None


def curves_figure(path, curves, *, baseline="intensity", title=None, overwrite=False):
    """Save ROC (left) and precision-recall (right) curves of every row on shared axes.

    Args:
      path: output PNG.
      curves: {row: {"fpr", "tpr", "recall", "precision": float lists}}, as results["curves"];
        a row without one pair is left out of that panel.
      baseline: the row drawn black dashed (the intensity baseline).
    The legend gives each row's area under the drawn curve (trapezoid rule, so AUPRC can differ
    slightly from a step-wise average precision). The PR panel's dotted line is the precision
    of flagging every pixel, i.e. the prevalence, when a curve reaches recall 1.
    """
    rows = sorted(curves, key=row_order)
    if not rows:
        raise ValueError("curves_figure: no curves to draw (results['curves'] is empty)")
    colours = iter(plt.get_cmap("tab10").colors * (len(rows) // 10 + 1))
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    for row in rows:
        c = curves[row]
        style = (dict(color="black", linestyle="--", linewidth=1.6) if row == baseline
                 else dict(color=next(colours), linewidth=1.2))
        name = f"{row} (baseline)" if row == baseline else row
        for ax, x, y in ((roc, "fpr", "tpr"), (pr, "recall", "precision")):
            if len(c.get(x, ())) and len(c.get(y, ())):
                ax.plot(c[x], c[y], label=f"{name}: {_area(c[x], c[y]):.3f}", **style)
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    prevalence = _flag_all_precision(curves)
    if prevalence is not None:
        pr.axhline(prevalence, color="grey", linestyle=":", linewidth=0.8,
                   label=f"prevalence: {prevalence:.3f}")
    for ax, (xl, yl, what) in ((roc, ("false positive rate", "true positive rate", "AUROC")),
                               (pr, ("recall", "precision", "AUPRC"))):
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xl, ylabel=yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=f"{what} (trapezoid)", title_fontsize=7,
                  loc="lower right" if ax is roc else "upper right")
    roc.set_title("ROC (pixels)", fontsize=9)
    pr.set_title("precision-recall (pixels)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def scale_map(m, brain, threshold=None):
    """A map on the overlays' common scale: (m - p1) / (t - p1), clipped to [0, 2].

    Args:
      m, brain: (H, W) map and brain mask of one slice.
      threshold: the map's validation threshold t; None: its 99th percentile in the brain.
    Returns:
      (scaled, t): float64 (H, W), NaN outside the brain (and where m is not finite, as the
      float32-min background of ensemble maps need not be), and the t used (None: no brain).
      p1 is the 1st percentile inside the brain, so 0 = brain p1 and 1 = the threshold.
    """
    m = np.asarray(m, np.float64)
    inside = np.asarray(brain, bool) & np.isfinite(m)
    scaled = np.full(m.shape, np.nan)
    if not inside.any():
        return scaled, None
    p1 = np.percentile(m[inside], 1)
    t = float(np.percentile(m[inside], 99) if threshold is None else threshold)
    if t > p1:
        scaled[inside] = np.clip((m[inside] - p1) / (t - p1), 0, 2)
    else:  # threshold at or below p1: (almost) all the brain is above it
        scaled[inside] = np.where(m[inside] >= t, 2.0, 0.0)
    return scaled, t


def _contour(ax, mask, colour, width):
    mask = np.asarray(mask, bool)
    if mask.any() and not mask.all():
        ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=colour, linewidths=width,
                   origin="lower")


def overlay_figure(path, image, lesion, brain, maps, *, thresholds=None, title=None,
                   overwrite=False):
    """Save one slice: the image with its ground truth, then each map over the image.

    Every map is shown on one shared colour scale (`scale_map`: 0 = its 1st percentile in
    the brain, 1 = its validation threshold, clipped at 2) with one colour bar, so the panels
    compare what each map flags at its own operating point. Green: ground-truth contour;
    red: where the map is >= its threshold.

    Args:
      path: output PNG.
      image, lesion, brain: (H, W) slice ((H, W, C): the first sequence is shown), lesion
        mask (None: no truth contour), brain mask.
      maps: {name: (H, W) map}; values outside the brain are not shown.
      thresholds: {name: validation threshold}; a map without one is scaled to its 99th
        percentile in the brain (marked * in its panel title and the colour bar label).
    """
    thresholds = thresholds or {}
    image, brain = np.asarray(image, np.float32), np.asarray(brain, bool)
    image = image[..., 0] if image.ndim == 3 else image
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, squeeze=False, figsize=(2.2 * n + 1.0, 2.7),
                             layout="constrained")
    axes = axes[0]
    grey = dict(cmap="gray", origin="lower", interpolation="nearest")
    axes[0].imshow(image.T, **grey)
    axes[0].set_title("image", fontsize=8)
    for ax in axes:  # truth first (wider), so the threshold contour stays visible on top
        if lesion is not None:
            _contour(ax, lesion, "lime", 1.4)
        ax.set_xticks([])
        ax.set_yticks([])
    no_threshold = []
    im = None
    for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
        t = thresholds.get(name)
        if t is None:
            no_threshold.append(name)
        scaled, t_used = scale_map(m, brain, t)
        ax.imshow(image.T, **grey)
        im = ax.imshow(np.ma.masked_invalid(scaled).T, cmap="inferno", vmin=0, vmax=2,
                       alpha=0.65, origin="lower", interpolation="nearest")
        if t_used is not None:
            _contour(ax, brain & (np.asarray(m, np.float64) >= t_used), "red", 0.8)
        ax.set_title(name + (" *" if t is None else ""), fontsize=8)
    if im is not None:
        label = "(map - brain p1) / (t - brain p1):\n0 = brain p1, 1 = validation threshold t"
        if no_threshold:
            label += "\n* no threshold: t = brain p99"
        bar = fig.colorbar(im, ax=list(axes), shrink=0.9, pad=0.01)
        bar.set_label(label, fontsize=7)
        bar.set_ticks([0, 0.5, 1, 1.5, 2], labels=["0", "0.5", "1 = t", "1.5", ">= 2"])
        bar.ax.tick_params(labelsize=7)
    keys = [("lime", "ground truth")] * (lesion is not None) + [("red", "map >= t")] * bool(maps)
    if keys:
        fig.legend([plt.Line2D([], [], color=c, linewidth=1.2) for c, _ in keys],
                   [k for _, k in keys], loc="outside lower center", ncol=2, fontsize=7,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
