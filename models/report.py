"""The HTML training report: IVR-FPR curve per slice (PNG), baselines, calibration, labels."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.labels import human_weight_text  # noqa: E402
from models.metrics import Curve  # noqa: E402


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_curve(name: str, c: Curve, path: Path, thresholds: dict) -> None:
    """IVR against FPR for one slice (with truth recall when known), the chosen point marked."""
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    fpr = np.nan_to_num(c.fpr, nan=0.0)
    ax.plot(fpr, c.ivr, label="IVR", color="#1f77b4")
    if c.bot_recall is not None:
        ax.plot(fpr, c.bot_recall, label="bot recall (truth)", color="#2ca02c", ls="--")
    ax.plot(
        fpr, np.nan_to_num(c.coverage, nan=0.0), label="robotic coverage", color="#ff7f0e", ls=":"
    )
    t = thresholds.get(name)
    if t is not None and len(c.threshold):
        i = int(np.searchsorted(-c.threshold, -t, side="right")) - 1
        i = min(max(i, 0), len(c.threshold) - 1)
        ax.scatter([fpr[i]], [c.ivr[i]], color="red", zorder=5, label=f"threshold {t:.3f}")
    ax.set_xlim(0, min(0.2, max(0.02, float(np.nanmax(fpr)) if len(fpr) else 0.2)))
    ax.set_ylim(0, 1)
    ax.set_xlabel("FPR (invalidated purchasing clicks)")
    ax.set_ylabel("share")
    ax.set_title(f"{name}: {c.n:,} clicks, {c.p:,} purchasing", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(folder: Path, result: dict, curves: dict[str, Curve]) -> Path:
    """Write ``report.html`` and ``plots/*.png`` into a version folder."""
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    thresholds = result["calibration"].get("thresholds", {})
    figures = []
    for name, c in curves.items():
        file = plots / f"ivr_fpr_{name.replace('/', '_')}.png"
        plot_curve(name, c, file, thresholds)
        figures.append(f'<figure><img src="plots/{file.name}" alt="{html.escape(name)}"></figure>')
    test = result["metrics"]["test"]
    slice_rows = [{"slice": k, **v} for k, v in sorted(test["slices"].items())]
    slice_rows.insert(0, {"slice": "overall", **test["overall"]})
    metric_cols = [
        c
        for c in (
            "slice",
            "clicks",
            "purchasing_clicks",
            "ivr",
            "fpr",
            "coverage",
            "bot_recall",
            "human_fpr",
            "precision",
        )
        if c == "slice" or c in test["overall"]
    ]
    baseline_cols = [
        c
        for c in (
            "model",
            "ivr_at_equal_fpr",
            "threshold",
            "ivr",
            "fpr",
            "coverage",
            "bot_recall",
            "human_fpr",
            "precision",
            "bot_recall_at_1pct_human_fpr",
        )
        if any(c in r for r in result["baselines"])
    ]
    cal_rows = result["calibration"].get("slices", [])
    cal_cols = list(cal_rows[0].keys()) if cal_rows else []
    comparison = result["global_comparison"]
    comp_rows = [
        {"measure": k, "value": v} for k, v in comparison.items() if not isinstance(v, dict | list)
    ]
    label_rows = [{"measure": k, "value": v} for k, v in result["labels"].items()]
    guard_rows = result["guardrails"]
    proxy = result.get("proxy_vs_truth", {"rows": [], "warnings": []})
    proxy_cols = [
        "slice",
        "clicks",
        "human_label_share",
        "proxy_fpr",
        "true_human_fpr",
        "truth_over_proxy",
    ]
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in proxy["warnings"])
    representations = result.get("representations", [])
    rep_cols = [
        "model",
        "oof_weak_auc",
        "oof_ivr_at_budget",
        "test_ivr_at_budget",
        "test_bot_recall_at_1pct_human_fpr",
        "members_per_fold",
        "seconds",
        "shipped",
    ]
    propensity = result.get("propensity", {"rows": []})
    prop_rows = [
        {k: v for k, v in r.items() if k != "label_rate_by_value"} for r in propensity["rows"]
    ]
    prop_cols = list(prop_rows[0].keys()) if prop_rows else []
    by_kind = result.get("recall_by_kind", [])
    by_kind_html = (
        "<h2>Bot recall by robot kind at 1% true human FPR (held-out day)</h2>\n"
        "<p>Simulated data only: the share of each kind's clicks at or above the threshold "
        "that invalidates 1% of the true humans, for every model. Models that tie overall "
        "can miss different robots.</p>\n" + _table(by_kind, list(by_kind[0].keys()))
        if by_kind
        else ""
    )
    weight = propensity.get("human_weight")
    weight_line = (
        ""
        if weight is None
        else f"<p>Human labels under the weights (fit days): {human_weight_text(weight)}. "
        "Few effective labels make the highest scores vary with a network's initial "
        "weights.</p>"
    )
    poor = result.get("label_poor_slices", [])
    poor_table = (
        _table(poor, ["slice", "clicks", "purchasing_clicks", "threshold", "why"])
        if poor
        else "<p>none</p>"
    )
    architecture = html.escape(str(result.get("architecture", "mlp")))
    embeddings = result.get("embeddings")
    embedding_line = (
        ""
        if embeddings is None
        else f"<p>Id embeddings: width {int(embeddings['width'])} per table; "
        f"{len(embeddings['tables_carrying_ids'])} tables carry ids on the fit days "
        f"({html.escape(', '.join(embeddings['tables_carrying_ids']) or 'none')}), sharing "
        f"a budget of {int(embeddings['budget'])} inputs."
        + (
            " Target-encoded (out of fold; smoothing "
            f"{float(embeddings['target_encoding_smoothing']):g}; the log-ratio of the "
            "bucket's weighted human labels to "
            + (
                "what its clicks' (logged-in, device) cells predict"
                if embeddings.get("target_encoding_cells")
                else "the overall rate"
            )
            + "): "
            f"{html.escape(', '.join(embeddings['target_encoded']))}."
            if embeddings.get("target_encoded")
            else ""
        )
        + "</p>"
    )
    spec_version = html.escape(result["feature_spec_version"])
    calibration_method = html.escape(str(result["calibration"].get("method")))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slidr model report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.3em; }}
</style></head><body>
<h1>slidr model report</h1>
<p>Data {html.escape(", ".join(result["data"]["days"]))}: the first days cross-fitted (models
averaged over folds, thresholds calibrated on out-of-fold scores), figures below on the
held-out day {html.escape(result["data"]["days"][-1])}; architecture shipped:
{architecture}. Feature spec {spec_version},
data fingerprint <code>{result["data"]["fingerprint"][:16]}</code>.</p>
<h2>Baselines at equal overall FPR (held-out day)</h2>
<p>Every model gets one global threshold giving the same overall FPR as the MLP's slice
thresholds; bot recall at 1% human FPR uses the ground truth of simulated data.</p>
{_table(result["baselines"], baseline_cols)}
{by_kind_html}
<h2>Proxy against truth per slice (held-out day, slice thresholds)</h2>
<p>The proxy FPR counts invalidated purchasing clicks; the true human FPR (simulated data
only) counts invalidated human clicks. They disagree where purchasers are not a
representative sample of a slice's humans.</p>
{_table(proxy["rows"], proxy_cols)}
{f"<p><b>Proxy and truth disagree by more than 2x:</b></p><ul>{warnings}</ul>" if warnings else ""}
<h2>Representations (context as hashed slots or per-field embeddings; MLP or DCN-v2)</h2>
<p>Each cross-fitted over the fit days with one network per fold; the one whose out-of-fold
scores rank the weak labels best (AUC under the training weights) ships, with more networks
per fold (its held-out figures are the shipped model's). Held-out figures are shown for every
one, and were not used to choose.</p>
{embedding_line}
{_table(representations, rep_cols)}
<h2>Label propensity</h2>
<p>{html.escape(str(propensity.get("note", "")))}. Inputs switched off:
{html.escape(", ".join(result.get("masked_features", [])))}; weighting
{html.escape(str(propensity.get("weighting", "")))}.</p>
{weight_line}
{_table(prop_rows, prop_cols)}
<h2>Label-poor slices</h2>
{poor_table}
<h2>Slice calibration against one global threshold (held-out day)</h2>
{_table(comp_rows, ["measure", "value"])}
<h2>Calibration ({calibration_method}, on out-of-fold scores of the fit days)</h2>
{_table(cal_rows, cal_cols)}
<h2>Metrics per slice (held-out day, slice thresholds)</h2>
{_table(slice_rows, metric_cols)}
<h2>IVR–FPR curves per slice (held-out day)</h2>
{"".join(figures)}
<h2>Labels</h2>
{_table(label_rows, ["measure", "value"])}
<h2>Guardrails</h2>
{_table(guard_rows, ["name", "passed", "value", "limit", "detail"])}
</body></html>
"""
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
