"""The three PNGs of a diagnose Report (matplotlib, Agg canvas: no display, no global backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(w: float, h: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ModuleNotFoundError("diagnose plots need matplotlib: pip install matplotlib "
                                  "(Report.save(out_dir, plots=False) writes the tables only)") from err
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _arr(x) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=float)


def smooth(y: np.ndarray, width: int) -> np.ndarray:
    """Centered moving average ignoring NaNs (NaN where the window holds no value)."""
    if width <= 1:
        return y
    ok = ~np.isnan(y)
    kernel = np.ones(width)
    num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    return np.where(ok & (den > 0), num / np.maximum(den, 1), np.nan)


def _positive(y: np.ndarray) -> np.ndarray:
    return np.where(y > 0, y, np.nan)


def plot_vertical(report, path) -> Path:
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for m, c in zip(report.models, _colors(len(report.models))):
        acc, loc = _arr(m["vertical"]["accumulated"]), _arr(m["vertical"]["local"])
        x = np.arange(len(acc))
        ax.plot(x, _positive(acc), "-", color=c, lw=2, label=f"{m['name']}: end to end (accumulated)")
        ax.plot(x, _positive(loc), "--", color=c, lw=1.4, label=f"{m['name']}: layer alone (local)")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error of the residual stream")
    ax.set_title("Vertical: quantization error through the layers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)


def plot_horizontal(report, path) -> Path:
    models = report.models
    n = max(1, len(models))
    T = report.settings["seq_len"]
    width = max(1, T // 32)
    fig = _figure(4.2 * n + 0.6, 6.4)
    keys = ["0"] + [str(p) for p in report.settings.get("prompt_lens", [])]
    colors = _colors(len(keys))
    axes = [[fig.add_subplot(2, n, r * n + j + 1) for j in range(n)] for r in range(2)]
    for j, m in enumerate(models):
        for k, c in zip(keys, colors):
            curve = m["horizontal"][k]
            label = "no FP prompt" if k == "0" else f"FP prompt P={k}"
            e = smooth(_arr(curve["error"]), width)
            d = smooth(_arr(curve["nll_increase"]), width)
            axes[0][j].plot(np.arange(len(e)), _positive(e), color=c, lw=1.3, label=label)
            axes[1][j].plot(np.arange(len(d)), d, color=c, lw=1.3, label=label)
            if k != "0":
                for r in range(2):
                    axes[r][j].axvline(int(k), color=c, ls=":", lw=0.8)
        axes[0][j].set_title(m["name"], fontsize=9)
        axes[0][j].set_yscale("log")
        axes[1][j].axhline(0.0, color="k", lw=0.5)
        axes[1][j].set_xlabel("token position in the window")
        for r in range(2):
            axes[r][j].grid(True, alpha=0.3)
    axes[0][0].set_ylabel("last-layer error")
    axes[1][0].set_ylabel("NLL increase vs FP (nats)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Horizontal: error across positions (moving average over {width} positions, "
                 f"{report.settings['windows']} windows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)


def plot_injection(report, path) -> Path:
    from matplotlib.colors import LogNorm

    inj = report.injection
    heat = np.array([_arr(r) for r in inj["error"]])
    positions = inj["positions"]
    T = heat.shape[1]
    fig = _figure(11, 4.4)
    ax = fig.add_subplot(1, 2, 1)
    shown = np.where(heat > 0, heat, np.nan)
    vmax = np.nanmax(shown) if np.isfinite(np.nanmax(shown)) else 1.0
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=max(vmax * 1e-4, 1e-12), vmax=vmax), extent=(-0.5, T - 0.5, len(positions), 0))
    ax.set_yticks(np.arange(len(positions)) + 0.5)
    ax.set_yticklabels([str(p) for p in positions], fontsize=6)
    ax.set_xlabel("later position t")
    ax.set_ylabel("position s whose K/V is quantized")
    ax.set_title(f"one token's K/V at {inj['bits']} bits: last-layer error (0 before s: white)", fontsize=9)
    fig.colorbar(im, ax=ax)
    ax2 = fig.add_subplot(1, 2, 2)
    d = _arr(inj["by_distance"])
    counts = np.array(inj.get("by_distance_count", [2] * len(d)))
    d = np.where(counts >= 2, d, np.nan)  # the far end has a single injected position: not a mean
    ax2.plot(np.arange(len(d)), _positive(d), color="C3")
    ax2.set_xscale("symlog", linthresh=1)
    ax2.set_yscale("log")
    ax2.set_xlabel("distance t - s")
    ax2.set_ylabel("mean last-layer error")
    ax2.set_title("how far it spreads (mean over injected positions s)", fontsize=9)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)
