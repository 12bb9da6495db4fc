"""A study's figures from its points table: PNG (matplotlib) and interactive HTML fragments (plotly).

Four figures, each in both forms, under `<study_dir>/figures/` with fixed names (`<name>.png`, `<name>.html`):
- `frontier`: gold reward vs KL(π‖π_ref), like the DPO paper's Figure 2 — every (setting, step) point per method,
  each method's Pareto frontier as a staircase (the best gold reachable under a KL budget is a step function of
  the budget), seed confidence intervals on the frontier points, the shared SFT model at KL 0;
- `reward_vs_step`: gold and proxy reward against training step (over-optimisation: proxy climbing while gold
  stalls or falls);
- `kl_vs_step`: KL against training step;
- `length_vs_reward`: response length against gold reward (does reward come from length?).

matplotlib is used through `matplotlib.figure.Figure` (no pyplot): no global backend switch, no figure registry to
leak in long studies, and the same objects display in notebooks. The HTML fragments carry no plotly.js; the
report inlines it once for all of them.
"""
from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from rlhf_lab.eval import frontier as fr
from rlhf_lab.utils.cache import atomic_write_text

FIGURE_TITLES = {
    "frontier": "Gold reward vs KL: the reward–KL frontier",
    "reward_vs_step": "Gold and proxy reward vs training step (over-optimisation)",
    "kl_vs_step": "KL(π‖π_ref) vs training step",
    "length_vs_reward": "Response length vs gold reward",
}
# Fixed colours for the methods the lab ships, so a method keeps its colour across studies; others cycle.
_METHOD_COLOURS = {"dpo (sigmoid)": "#1f77b4", "ppo": "#ff7f0e", "ppo_gt": "#2ca02c", "ipo": "#d62728"}
_SPARE_COLOURS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_MPL_DASHES = ["-", "--", ":", "-."]
_PLOTLY_DASHES = ["solid", "dash", "dot", "dashdot"]
_KL_LABEL = "KL(π‖π_ref), nats (policy samples)"
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass(frozen=True)
class PlotData:
    """Everything the figures draw, computed once from the points table."""

    agg: pd.DataFrame        # frontier.aggregate_seeds: one row per (method, setting, step)
    front: pd.DataFrame      # frontier.pareto_frontier of agg
    baseline: dict           # frontier.sft_baseline
    colours: dict[str, str]  # method label -> colour


@dataclass(frozen=True)
class FigureFiles:
    name: str
    title: str
    png: Path
    html: Path               # plotly fragment (a <div> + its script), no plotly.js


def plot_data(points: pd.DataFrame) -> PlotData:
    agg = fr.aggregate_seeds(points)
    labels = sorted(agg["method_label"].unique()) if not agg.empty else []
    spare = iter(_SPARE_COLOURS * (1 + len(labels) // len(_SPARE_COLOURS)))
    colours = {m: _METHOD_COLOURS.get(m) or next(spare) for m in labels}
    return PlotData(agg, fr.pareto_frontier(agg), fr.sft_baseline(points), colours)


def _settings(d: PlotData, method: str) -> list[tuple[str, pd.DataFrame, int]]:
    """(setting, its trained-and-SFT rows sorted by step, style index) for one method."""
    g = d.agg[d.agg["method_label"] == method]
    return [(s, gs.sort_values("step"), i % len(_MPL_DASHES)) for i, (s, gs) in enumerate(g.groupby("setting"))]


def _methods(d: PlotData) -> list[str]:
    return list(d.colours)


# ---------------------------------------------------------------- matplotlib


def _mpl_frontier(d: PlotData) -> MplFigure:
    fig = MplFigure(figsize=(7.5, 5.0), dpi=110)
    ax = fig.add_subplot()
    pts = fr.trained_points(d.agg)
    for m in _methods(d):
        c, g, f = d.colours[m], pts[pts["method_label"] == m], d.front[d.front["method_label"] == m]
        ax.scatter(g["kl_mean"], g["gold_mean"], s=14, color=c, alpha=0.35, linewidths=0)
        ax.errorbar(f["kl_mean"], f["gold_mean"],
                    yerr=[f["gold_mean"] - f["gold_ci_low"], f["gold_ci_high"] - f["gold_mean"]],
                    xerr=[f["kl_mean"] - f["kl_ci_low"], f["kl_ci_high"] - f["kl_mean"]],
                    fmt="o", ms=4, color=c, elinewidth=0.8, capsize=2, label=m)
        ax.plot(f["kl_mean"], f["gold_mean"], color=c, drawstyle="steps-post", linewidth=1.4)
    if np.isfinite(d.baseline["gold_mean"]):
        ax.axhline(d.baseline["gold_mean"], color="black", linestyle=":", linewidth=0.8)
        ax.plot([0.0], [d.baseline["gold_mean"]], marker="*", ms=10, color="black", linestyle="", label="SFT")
    ax.set(xlabel=_KL_LABEL, ylabel="gold reward", title=FIGURE_TITLES["frontier"])
    # KL ≥ 0: the part of a symmetric seed interval below zero (wide with 2 seeds: t₀.₉₇₅,₁ = 12.7) is not shown
    ax.set_xlim(left=-0.02 * max(1.0, ax.get_xlim()[1]))
    ax.grid(alpha=0.3)
    if _methods(d):
        ax.legend(fontsize=8, loc="lower right")
    return fig


def _mpl_lines(ax, d: PlotData, y: str, lo: str | None, hi: str | None) -> None:
    for m in _methods(d):
        for setting, g, k in _settings(d, m):
            if g[y].isna().all():
                continue  # e.g. proxy reward for the DPO family, which has no reward model
            ax.plot(g["step"], g[y], color=d.colours[m], linestyle=_MPL_DASHES[k], marker="o", ms=3,
                    label=f"{m} {setting}")
            if lo and hi:
                ax.fill_between(g["step"], g[lo], g[hi], color=d.colours[m], alpha=0.12, linewidth=0)


def _mpl_reward_vs_step(d: PlotData) -> MplFigure:
    fig = MplFigure(figsize=(11.0, 4.5), dpi=110)
    gold_ax, proxy_ax = fig.subplots(1, 2, sharex=True)
    _mpl_lines(gold_ax, d, "gold_mean", "gold_ci_low", "gold_ci_high")
    _mpl_lines(proxy_ax, d, "proxy_mean", None, None)
    gold_ax.set(xlabel="training step", ylabel="gold reward", title="gold reward (seed mean, 95% CI)")
    proxy_ax.set(xlabel="training step", ylabel="proxy reward (reward model)", title="proxy reward")
    for ax in (gold_ax, proxy_ax):
        ax.grid(alpha=0.3)
    if gold_ax.lines:
        gold_ax.legend(fontsize=7)
    fig.suptitle(FIGURE_TITLES["reward_vs_step"])
    return fig


def _mpl_kl_vs_step(d: PlotData) -> MplFigure:
    fig = MplFigure(figsize=(7.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    _mpl_lines(ax, d, "kl_mean", "kl_ci_low", "kl_ci_high")
    ax.set(xlabel="training step", ylabel=_KL_LABEL, title=FIGURE_TITLES["kl_vs_step"])
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return fig


def _mpl_length_vs_reward(d: PlotData) -> MplFigure:
    fig = MplFigure(figsize=(7.5, 4.5), dpi=110)
    ax = fig.add_subplot()
    pts = fr.trained_points(d.agg)
    for m in _methods(d):
        g = pts[pts["method_label"] == m]
        ax.scatter(g["response_len_mean"], g["gold_mean"], s=16, color=d.colours[m], alpha=0.7, label=m)
    ax.set(xlabel="mean response length (tokens)", ylabel="gold reward", title=FIGURE_TITLES["length_vs_reward"])
    ax.grid(alpha=0.3)
    if _methods(d):
        ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- plotly


def _hover(g: pd.DataFrame, m: str) -> list[str]:
    return [f"{m} {s}<br>step {st}, seeds {n} ({k})<br>KL {kl:.3g} [{kl_lo:.3g}, {kl_hi:.3g}]"
            f"<br>gold {gd:.3f} [{lo:.3f}, {hi:.3f}]"
            for s, st, n, k, kl, kl_lo, kl_hi, gd, lo, hi in
            zip(g["setting"], g["step"], g["n_seeds"], g["ci_kind"], g["kl_mean"], g["kl_ci_low"],
                g["kl_ci_high"], g["gold_mean"], g["gold_ci_low"], g["gold_ci_high"])]


def _plotly_frontier(d: PlotData) -> go.Figure:
    fig = go.Figure()
    pts = fr.trained_points(d.agg)
    for m in _methods(d):
        c, g, f = d.colours[m], pts[pts["method_label"] == m], d.front[d.front["method_label"] == m]
        fig.add_trace(go.Scatter(x=g["kl_mean"], y=g["gold_mean"], mode="markers", legendgroup=m, showlegend=False,
                                 marker={"color": c, "size": 6, "opacity": 0.35}, hovertext=_hover(g, m),
                                 hoverinfo="text", name=f"{m} (all points)"))
        fig.add_trace(go.Scatter(
            x=f["kl_mean"], y=f["gold_mean"], mode="lines+markers", line={"color": c, "shape": "hv"}, name=m,
            legendgroup=m, marker={"size": 7}, hovertext=_hover(f, m), hoverinfo="text",
            error_y={"type": "data", "array": f["gold_ci_high"] - f["gold_mean"],
                         "arrayminus": f["gold_mean"] - f["gold_ci_low"], "thickness": 1},
            error_x={"type": "data", "array": f["kl_ci_high"] - f["kl_mean"],
                         "arrayminus": f["kl_mean"] - f["kl_ci_low"], "thickness": 1}))
    if np.isfinite(d.baseline["gold_mean"]):
        fig.add_trace(go.Scatter(x=[0.0], y=[d.baseline["gold_mean"]], mode="markers", name="SFT",
                                 marker={"symbol": "star", "size": 12, "color": "black"}))
    fig.update_layout(title=FIGURE_TITLES["frontier"], xaxis_title=_KL_LABEL, yaxis_title="gold reward",
                      template="plotly_white", height=480)
    return fig


def _plotly_lines(fig: go.Figure, d: PlotData, y: str, lo: str | None, hi: str | None, col: int | None) -> None:
    where = {"row": 1, "col": col} if col else {}
    for m in _methods(d):
        for setting, g, k in _settings(d, m):
            if g[y].isna().all():
                continue
            err = ({"type": "data", "array": g[hi] - g[y], "arrayminus": g[y] - g[lo], "thickness": 1} if lo else None)
            fig.add_trace(go.Scatter(x=g["step"], y=g[y], mode="lines+markers", name=f"{m} {setting}",
                                     legendgroup=f"{m} {setting}", showlegend=col != 2,
                                     line={"color": d.colours[m], "dash": _PLOTLY_DASHES[k]}, error_y=err), **where)


def _plotly_reward_vs_step(d: PlotData) -> go.Figure:
    # legend entries come from the gold panel; each proxy line shares its legend group, so one click hides both
    fig = make_subplots(rows=1, cols=2, subplot_titles=("gold reward (seed mean, 95% CI)", "proxy reward"))
    _plotly_lines(fig, d, "gold_mean", "gold_ci_low", "gold_ci_high", col=1)
    _plotly_lines(fig, d, "proxy_mean", None, None, col=2)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="gold reward", row=1, col=1)
    fig.update_yaxes(title_text="proxy reward", row=1, col=2)
    fig.update_layout(title=FIGURE_TITLES["reward_vs_step"], template="plotly_white", height=460)
    return fig


def _plotly_kl_vs_step(d: PlotData) -> go.Figure:
    fig = go.Figure()
    _plotly_lines(fig, d, "kl_mean", "kl_ci_low", "kl_ci_high", col=None)
    fig.update_layout(title=FIGURE_TITLES["kl_vs_step"], xaxis_title="training step", yaxis_title=_KL_LABEL,
                      template="plotly_white", height=460)
    return fig


def _plotly_length_vs_reward(d: PlotData) -> go.Figure:
    fig = go.Figure()
    pts = fr.trained_points(d.agg)
    for m in _methods(d):
        g = pts[pts["method_label"] == m]
        fig.add_trace(go.Scatter(x=g["response_len_mean"], y=g["gold_mean"], mode="markers", name=m,
                                 marker={"color": d.colours[m], "size": 7}, hovertext=_hover(g, m), hoverinfo="text"))
    fig.update_layout(title=FIGURE_TITLES["length_vs_reward"], xaxis_title="mean response length (tokens)",
                      yaxis_title="gold reward", template="plotly_white", height=460)
    return fig


_BUILDERS: dict[str, tuple[Callable[[PlotData], MplFigure], Callable[[PlotData], go.Figure]]] = {
    "frontier": (_mpl_frontier, _plotly_frontier),
    "reward_vs_step": (_mpl_reward_vs_step, _plotly_reward_vs_step),
    "kl_vs_step": (_mpl_kl_vs_step, _plotly_kl_vs_step),
    "length_vs_reward": (_mpl_length_vs_reward, _plotly_length_vs_reward),
}


def matplotlib_figure(name: str, data: PlotData) -> MplFigure:
    """One figure as a matplotlib Figure (`name` in FIGURE_TITLES)."""
    return _BUILDERS[name][0](data)


def plotly_figure(name: str, data: PlotData) -> go.Figure:
    """One figure as a plotly Figure (`name` in FIGURE_TITLES)."""
    return _BUILDERS[name][1](data)


def png_bytes(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    # no Software/date metadata: the same points give byte-identical PNGs
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def html_fragment(fig: go.Figure, name: str) -> str:
    """A <div> with the figure and its script; the page must load plotly.js once before it (the report does)."""
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"rlhf-fig-{name}",
                       config=_PLOTLY_CONFIG)


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Readers see the old file or the whole new one, never a half-written PNG."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_figures(points: pd.DataFrame, fig_dir: Path) -> list[FigureFiles]:
    """Write every figure as `<fig_dir>/<name>.png` and `<fig_dir>/<name>.html` (atomically); return their paths."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    data = plot_data(points)
    files = []
    for name, title in FIGURE_TITLES.items():
        png, html = fig_dir / f"{name}.png", fig_dir / f"{name}.html"
        _atomic_write_bytes(png, png_bytes(matplotlib_figure(name, data)))
        atomic_write_text(html, html_fragment(plotly_figure(name, data), name))
        files.append(FigureFiles(name, title, png, html))
    return files
