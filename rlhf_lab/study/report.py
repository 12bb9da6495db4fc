"""One self-contained HTML report per study: `<study_dir>/report.html`.

Self-contained means it opens from a laptop on a train: plotly.js is inlined once, PNGs are base64 data URIs,
the CSS is inline, and nothing refers to a URL. A Content-Security-Policy meta tag makes the browser enforce
that (any attempt to fetch something would be blocked and logged as an error, which the browser test catches).

    python -m rlhf_lab.study.report <study_dir>     # write the report and print the frontier summary
"""
from __future__ import annotations

import base64
import html
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml
from plotly.offline import get_plotlyjs

from rlhf_lab.eval import frontier as fr
from rlhf_lab.eval.overoptimisation import describe_peak, overoptimisation_fits
from rlhf_lab.eval import convergence, paired
from rlhf_lab.study import plots
from rlhf_lab.study import report_tables as rt
from rlhf_lab.utils.cache import atomic_write_text

# 'unsafe-eval': plotly.js compiles a few helpers with Function(); everything else is inline or a data: URI.
CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
       "img-src data:; font-src data:")
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5rem; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.2rem; }
.sub { color: #555; margin-top: 0; } .note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.4rem 0.8rem; }
table.tbl { border-collapse: collapse; font-size: 0.86rem; margin: 0.6rem 0; }
table.tbl th, table.tbl td { border: 1px solid #ddd; padding: 0.25rem 0.55rem; text-align: left; vertical-align: top; }
table.tbl th { background: #f4f4f6; } table.tbl tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f8fa; padding: 0.7rem; overflow-x: auto; font-size: 0.8rem; }
figure { margin: 1rem 0 2rem 0; } img.static { max-width: 100%; border: 1px solid #eee; }
details summary { cursor: pointer; color: #444; }
"""
HOW_TO_READ = """
<p>Each point is one training run's checkpoint, evaluated on held-out prompts: its <b>KL(π‖π<sub>ref</sub>)</b>
(x: how far the policy moved from the SFT model, measured the same way for every method, on the policy's own
samples, in nats) against its <b>gold reward</b> (y: the task's true reward, not the learned reward model PPO
optimises). Points of one sweep setting (β for the DPO family, KL coefficient or target KL for PPO) are
averaged over seeds; error bars are 95% confidence intervals (a t-interval over seeds, or ±1.96 SE of the
evaluation when a setting has one seed).</p>
<p>The line through each method's points is its <b>frontier</b>: the best gold reward it reached within a KL
budget, over all its settings and checkpoints (the shared SFT model at KL 0, the star, is excluded: every method
starts there). Higher and further left is better. A method whose frontier lies above another's at every KL is
the more efficient optimiser of the true reward; compare methods at equal KL, not at their raw best, since
more KL usually buys more reward. PPO's proxy reward rising while its gold reward stalls (second figure) is
reward over-optimisation.</p>
"""


def _table(df: pd.DataFrame, empty: str = "(none)") -> str:
    if df is None or df.empty:
        return f"<p class='sub'>{html.escape(empty)}</p>"
    return df.to_html(index=False, escape=True, na_rep="—", classes="tbl", border=0)


def _figure_html(files: plots.FigureFiles) -> str:
    png = base64.b64encode(files.png.read_bytes()).decode("ascii")
    return (f"<figure id='{files.name}'><h3>{html.escape(files.title)}</h3>{files.html.read_text()}"
            f"<details><summary>static image (PNG, as in figures/{files.name}.png)</summary>"
            f"<img class='static' alt='{html.escape(files.title)}' src='data:image/png;base64,{png}'></details>"
            f"</figure>")


def _header(inputs: rt.StudyInputs) -> str:
    p = inputs.points
    parts = [f"<h1>rlhf_lab study: {html.escape(inputs.name)}</h1>"]
    if not p.empty:
        methods = ", ".join(sorted(fr.method_labels(p).unique()))
        base = fr.sft_baseline(p)
        parts.append(f"<p class='sub'>{p['run_id'].nunique()} runs · methods: {html.escape(methods)} · "
                     f"seeds: {p['seed'].nunique()} · {len(p)} evaluation points · "
                     f"SFT gold reward {base['gold_mean']:.3f}</p>")
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in inputs.notes]
    return "\n".join(parts)


def _results(inputs: rt.StudyInputs, budgets: Sequence[float]) -> str:
    p = inputs.points
    failed = rt.failed_runs(inputs.study_dir)
    failed_html = "".join(f"<p><b>{html.escape(r)}</b></p><pre>{html.escape(t)}</pre>" for r, t in failed)
    return (
        "<h2>Best gold reward per method at KL budgets</h2>"
        "<p class='sub'>seed-mean gold [95% CI] of the best checkpoint with mean KL within the budget "
        "(— : the method has no trained point that close to the reference)</p>"
        + _table(rt.budget_display_table(p, list(budgets)) if not p.empty else None)
        + _equal_cost(p) + _comparisons(p, budgets) + _plateau(p) + _overoptimisation(p)
        + "<h2>Frontier points</h2>" + _table(rt.frontier_display_table(p) if not p.empty else None)
        + "<h2>Runs (final evaluation)</h2>" + _table(rt.per_run_table(inputs)) + _preference_labels(inputs)
        + (f"<h2>Failed runs</h2>{failed_html}" if failed else "")
    )


def _equal_cost(points: pd.DataFrame) -> str:
    """Gold at equal cost, beside gold at equal KL: the same best-point rule with training FLOPs as the budget."""
    budgets = fr.default_cost_budgets(points) if not points.empty else []
    if not budgets:
        return ""
    return ("<h2>Best gold reward per method at training-FLOP budgets</h2>"
            "<p class='sub'>gold at equal cost: seed-mean gold [95% CI] of the best checkpoint whose seed-mean "
            "training FLOPs (2N per token forwarded, 6N per token back-propagated, every model role; the shared "
            "evaluation and stages excluded; best-of-n: its n samples per prompt and their scoring) are within the "
            "budget</p>" + _table(rt.cost_budget_display_table(points, budgets)))


def _preference_labels(inputs: rt.StudyInputs) -> str:
    """Runs whose pairs were labelled by an annotator other than the gold reward, or filtered by the reward model."""
    table = rt.preference_labels_table(inputs.study_dir)
    if table.empty:
        return ""
    return ("<h2>Preference labels (AI feedback, reward-model filter)</h2><p class='sub'>pairs the labeller "
            "relabelled and kept (ties and invalid verdicts dropped), how often it agrees with the gold reward on the "
            "pairs both decide and on clear-cut ones (gold gap &gt; 0.5), with 95% bootstrap intervals over prompts; "
            "and the pairs the reward-model margin filter kept, with the gold agreement of the kept and the dropped "
            "pairs</p>" + _table(table))


def _overoptimisation(points: pd.DataFrame) -> str:
    """Gao et al. 2023's functional form fitted to the arms that optimise a learned reward."""
    fits = overoptimisation_fits(points) if not points.empty else pd.DataFrame()
    if fits.empty:
        return ""
    table = pd.DataFrame({
        "method": fits["method"], "form": ["d(α − β log d)" if f == "rl" else "d(α − β d)" for f in fits["form"]],
        "α": fits["alpha"].map("{:.4f}".format), "β": fits["beta"].map("{:.4f}".format),
        "R²": fits["r2"].map("{:.3f}".format), "points": fits["points"],
        "fitted peak": [describe_peak(r) for r in fits.itertuples()]})
    return ("<h2>Reward-model over-optimisation</h2><p class='sub'>gold gain over each run's SFT start against "
            "d = √KL, fitted with Gao et al. 2023's forms (every evaluation of every run and seed); a peak inside "
            "the trained KL range means more optimisation of the learned reward lowers the gold reward</p>"
            + _table(table))


def _comparisons(points: pd.DataFrame, budgets: Sequence[float]) -> str:
    table = paired.paired_comparisons(points, budgets) if not points.empty else pd.DataFrame()
    if table.empty:
        return ""
    sentences = "".join(f"<li>{html.escape(s)}</li>" for s in table["sentence"])
    return ("<h2>Methods compared at each KL budget</h2>"
            "<p class='sub'>paired over seeds (seed s of both methods shares its SFT model and evaluation prompts): "
            "mean difference of gold reward with a 95% t-interval. Each method's point is its best at the budget, "
            "chosen on these seeds, which favours the method with more settings to choose from.</p>"
            f"<ul>{sentences}</ul>")


def _plateau(points: pd.DataFrame) -> str:
    warnings = convergence.convergence_warnings(points) if not points.empty else []
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return ("<h2>Runs still moving at their last evaluation</h2><p class='sub'>the last two evaluations differ by "
            "more than one standard error of their difference: these points say more about the training budget "
            f"than about the method</p><ul>{items}</ul>")


def _judges(inputs: rt.StudyInputs) -> str:
    from_points = rt.judge_points_table(inputs.points) if not inputs.points.empty else pd.DataFrame()
    judgements = rt.load_judgements(inputs.study_dir)
    if from_points.empty and judgements.empty:
        return ""
    out = "<h2>Judge win rates</h2>"
    if not from_points.empty:
        out += "<p class='sub'>final checkpoint of each run against the baseline, ties counted half</p>"
        out += _table(from_points)
    if not judgements.empty:
        out += "<h3>All judgements (judgements.csv)</h3>" + _table(judgements)
    return out


def _provenance(meta: dict) -> str:
    git = meta.get("git") or {}
    facts = pd.DataFrame([
        {"item": "git SHA", "value": f"{git.get('sha') or 'unknown'}{' (dirty tree)' if git.get('dirty') else ''}"},
        {"item": "started", "value": str(meta.get("started", "unknown"))},
        {"item": "finished", "value": str(meta.get("finished", "unknown"))},
    ])
    versions = pd.DataFrame([{"package": k, "version": str(v)} for k, v in (meta.get("versions") or {}).items()])
    spec = meta.get("spec")
    spec_text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True) if spec else "(not recorded)"
    return ("<h2>Provenance</h2>" + _table(facts) + "<h3>Wall time per stage</h3>"
            + _table(rt.stage_table(meta), "(not recorded)") + "<h3>Versions</h3>" + _table(versions, "(not recorded)")
            + f"<h3>Study config</h3><pre>{html.escape(spec_text)}</pre>")


def render_report(inputs: rt.StudyInputs, figures: list[plots.FigureFiles], budgets: Sequence[float]) -> str:
    """The whole page as one string (plotly.js inlined once, in <head>, before any figure's script)."""
    figs = "".join(_figure_html(f) for f in figures) or "<p class='sub'>(no points yet)</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rlhf_lab study: {html.escape(inputs.name)}</title>
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
{_header(inputs)}
<h2>How to read the frontier</h2>{HOW_TO_READ}
<h2>Figures</h2>{figs}
{_results(inputs, budgets)}
{_judges(inputs)}
{_provenance(inputs.meta)}
</body></html>
"""


def write_report(study_dir: Path, budgets: Sequence[float] | None = None) -> Path:
    """Write `<study_dir>/figures/*` and `<study_dir>/report.html` (atomically); return the report's path.

    `budgets`: KL budgets for the best-gold table; by default a 1-2-5 series spanning the study's KL range.
    Works on partial studies (missing study.json, failed runs, no judges); raises only on I/O errors.
    """
    study_dir = Path(study_dir)
    inputs = rt.load_inputs(study_dir)
    figures = [] if inputs.points.empty else plots.write_figures(inputs.points, study_dir / "figures")
    if budgets is None:
        budgets = fr.default_kl_budgets(inputs.points) if not inputs.points.empty else []
    path = study_dir / "report.html"
    atomic_write_text(path, render_report(inputs, figures, budgets))
    return path


def frontier_summary_text(points: pd.DataFrame, budgets: Sequence[float] | None = None) -> str:
    """The short best-gold-per-method-at-KL-budgets table as text (what a study prints at its end)."""
    if points.empty:
        return "(no points)"
    budgets = list(budgets) if budgets is not None else fr.default_kl_budgets(points)
    base = fr.sft_baseline(points)
    comparisons = paired.paired_comparisons(points, budgets)
    return (fr.budget_table_text(fr.best_at_kl_budgets(points, budgets))
            + f"\n(SFT start: gold {base['gold_mean']:.3f}; ± is the 95% CI half-width over seeds, or 1.96 SE "
              f"with one seed; — : no trained point within that KL)"
            + ("\n\npaired over seeds:\n" + "\n".join(comparisons["sentence"]) if not comparisons.empty else "")
            + "".join(f"\nwarning: {w}" for w in convergence.convergence_warnings(points)))


def print_frontier_summary(study_dir: Path, budgets: Sequence[float] | None = None) -> str:
    """Print (and return) the frontier summary of `<study_dir>/points.csv`."""
    text = frontier_summary_text(rt.load_inputs(Path(study_dir)).points, budgets)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rlhf_lab.study.report <study_dir>", file=sys.stderr)
        return 2
    print_frontier_summary(Path(args[0]))
    print(f"report: {write_report(Path(args[0]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
