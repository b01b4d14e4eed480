"""The loss curve of a run, loss.png: train and validation loss against the optimiser step."""

from pathlib import Path

from jaxvae.base.io import atomic_path
from jaxvae.training.validation import summarize

LOSS_CURVE_FILE = "loss.png"


def write_loss_curve(path, history: list[dict]) -> Path | None:
    """Save the loss curve: train and validation loss per epoch against the global step.

    The lowest validation loss is marked; the y axis is logarithmic when the losses are
    positive and span more than a factor of 10. Written atomically (jaxvae.base.io), replacing
    an older curve; matplotlib's Figure is used without pyplot, so no global backend state
    is touched.

    Args:
      path: output PNG.
      history: the lines of metrics.jsonl.

    Returns:
      path, or None when the history is empty (nothing written).
    """
    if not history:
        return None
    # imported on use: matplotlib (heavy) is loaded by a run that draws its curve, not by
    # `import jaxvae.training`
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], "o-", ms=3,
            label="train loss (epoch mean)")
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    values = [h["loss"] for h in history] + [v for _, v in val]
    if val:
        ax.plot(*zip(*val, strict=True), "s-", ms=3, label="validation loss")
        s = summarize(history)
        ax.plot([s["best_step"]], [s["best_val_loss"]], "*", ms=14, color="tab:red",
                label=f"best: {s['best_val_loss']:.4g} at step {s['best_step']}")
    if min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("negative beta-ELBO per image")
    stop = history[-1].get("stop")
    ax.set_title(f"{history[-1]['step']} steps" + (f", stopped by {stop}" if stop else ""),
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)
