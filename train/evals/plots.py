"""PNG figures of evaluation results (matplotlib, a default dependency; the `plots` extra is kept empty).

Without matplotlib every function raises `PlotsUnavailable` (an ImportError) with the install hint, so callers can
write their JSON first and skip the picture with one clear line.
"""

import math


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed (pip install 'effarch[plots]'): no PNG written") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def depth_heatmap(results: dict, lengths, depths, path: str, depth_label: str = "depth",
                  titles: dict | None = None) -> None:
    """One panel per entry of `results` ({name: {str(length): {"by_depth": {str(depth): accuracy}}}}): exact-match
    accuracy over lengths (x) and depths (y), annotated, written to `path`."""
    plt = _pyplot()
    import numpy as np

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        grid = np.array([[results[name][str(t)]["by_depth"][str(d)] for t in lengths] for d in depths])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(t) for t in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel(depth_label)
        ax.set_title((titles or {}).get(name, name))
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def accuracy_vs_state(panels: dict, path: str, title: str = "MQAR") -> None:
    """Zoology's figure: one panel per test segment, accuracy (y) against recurrent-state bytes (x, log scale), one
    line per mixer through its model sizes.

    Args:
      panels: {segment name: {mixer: [(state_bytes, accuracy, label), ...]}}; points are sorted by state bytes.
      path: the PNG to write.
    """
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    names = list(panels)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, seg in zip(axes.flat, names):
        for mixer, points in panels[seg].items():
            points = sorted(points)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o", label=mixer)
            for x, y, label in points:
                ax.annotate(label, (x, y), fontsize=6, textcoords="offset points", xytext=(2, 3))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap within a decade
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(seg, fontsize=9)
        ax.set_xlabel("state bytes per sequence")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def length_curves(results: dict, lengths, path: str, train_len: int | None = None) -> None:
    """Length extrapolation (perplexity --lengths): left, bits per byte (y) against the window length (x, log2);
    right, the bits per byte by position in the window, one line per length (the x value of a bucket is its middle
    position, log2). A dashed line marks the training length.

    Args:
      results: {"T{length}": {"bits_per_byte", "by_position": [{"start", "end", "bits_per_byte", "tokens"}, ...]}}.
      lengths: the lengths, in the order drawn.
      path: the PNG to write.
      train_len: data.seq_len of the run (None: no marker).
    """
    plt = _pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    ys = [results[f"T{t}"]["bits_per_byte"] for t in lengths]
    left.plot(lengths, ys, marker="o")
    left.set_xscale("log", base=2)
    left.set_xticks(lengths, [str(t) for t in lengths])
    left.set_xlabel("window length (tokens)")
    left.set_ylabel("bits per byte")
    left.set_title("held-out bits per byte by length")
    for t in lengths:
        points = [((b["start"] + b["end"]) / 2, b["bits_per_byte"]) for b in results[f"T{t}"]["by_position"]
                  if b["tokens"]]
        right.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"T={t}")
    right.set_xscale("log", base=2)
    right.set_xlabel("position in the window (bucket middle)")
    right.set_ylabel("bits per byte")
    right.set_title("by position")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if train_len:
            ax.axvline(train_len, color="gray", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
