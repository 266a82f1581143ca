"""The tables and the trade-off plot of `efddpm eval`, from the scores of every edit.

table.json   {"metrics", "scale", "rows": [...]}: one row per run (edit_type "all"), and for PIE-Bench one per edit
             type ("0" .. "9") too; each row: run, method, setting, edit_type, edits, not_scored (outputs of the run
             not in place: failed or missing items), and per metric its mean, 95% interval half-width (ci95), n
             and not_finite (efddpm.eval.stats), times the factor PIE-Bench's tables print it with ("scale")
table.csv    the same rows, one column per (metric, mean | ci95 | n)
tradeoff.png one curve per method over its sweep (the runs' skip, else cfg_tgt), y against x, each point labelled
             with its setting: the paper's Fig. 7 is clip against lpips

A run's method is its settings' "method" (edit-friendly when a run records none), "+p2p" with Prompt-to-Prompt;
its setting is its T_skip and target guidance (and P2P's fractions; "default": the run left them to the model or
the flag's default); a pair of folders is the method "pair".
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from PIL import Image

from efddpm.eval.charts import line_chart
from efddpm.eval.scales import TABLE_SCALE
from efddpm.eval.stats import summarise


@dataclass
class Run:
    """One run's description and its scores (one dict per scored edit, in the run's order)."""
    name: str
    settings: dict                 # its manifest's settings; {} for a pair of folders
    not_scored: int = 0
    scores: list[dict] = field(default_factory=list)
    edit_types: list[str | None] = field(default_factory=list)    # per scored edit

    @property
    def method(self) -> str:
        if not self.settings:
            return "pair"
        return self.settings.get("method", "edit-friendly") + ("+p2p" if self.settings.get("p2p") else "")

    @property
    def setting(self) -> str:
        s = self.settings
        if not s:
            return self.name
        shown = lambda key: "default" if s.get(key) is None else f"{s[key]:g}"    # None: the model's / the flag's
        text = f"skip {shown('skip')} cfg-tgt {shown('cfg_tgt')}"
        return text + (f" xa {shown('xa')} sa {shown('sa')}" if s.get("p2p") else "")


def rows(runs: list[Run], metrics: tuple[str, ...]) -> list[dict]:
    out = []
    for run in runs:
        groups = {"all": list(range(len(run.scores)))}
        for i, kind in enumerate(run.edit_types):
            if kind is not None:
                groups.setdefault(kind, []).append(i)
        for kind in ["all", *sorted(k for k in groups if k != "all")]:
            row = {"run": run.name, "method": run.method, "setting": run.setting, "edit_type": kind,
                   "edits": len(groups[kind]), "not_scored": run.not_scored if kind == "all" else 0}
            for m in metrics:
                summary = summarise([run.scores[i][m] for i in groups[kind]])
                scale = TABLE_SCALE.get(m, 1.0)
                row[m] = {**summary.as_dict(), "mean": summary.mean * scale, "ci95": summary.ci95 * scale}
            out.append(row)
    return out


def table_json(table: list[dict], metrics: tuple[str, ...]) -> str:
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v    # JSON has no NaN
    body = [{k: ({kk: clean(vv) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in row.items()}
            for row in table]
    return json.dumps({"metrics": list(metrics), "scale": {m: TABLE_SCALE.get(m, 1.0) for m in metrics},
                       "rows": body}, indent=1) + "\n"


def table_csv(table: list[dict], metrics: tuple[str, ...]) -> str:
    head = ["run", "method", "setting", "edit_type", "edits", "not_scored"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head + [f"{m}_{part}" for m in metrics for part in ("mean", "ci95", "n")])
    for row in table:
        writer.writerow([row[k] for k in head] + [f"{row[m][p]:.6g}" if p != "n" else row[m][p]
                                                  for m in metrics for p in ("mean", "ci95", "n")])
    return out.getvalue()


def heading(metric: str) -> str:
    """A metric's name as tables and axes print it, with its factor: "bg_mse (x10000)"."""
    return metric + (f" (x{TABLE_SCALE[metric]:g})" if metric in TABLE_SCALE else "")


def table_text(table: list[dict], metrics: tuple[str, ...]) -> str:
    """The rows of every edit ("all") as a Markdown table: mean +- ci95 per metric."""
    lines = ["| method | setting | edits | " + " | ".join(map(heading, metrics)) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for row in (r for r in table if r["edit_type"] == "all"):
        cells = [f"{row[m]['mean']:.4g} +- {row[m]['ci95']:.2g}" if math.isfinite(row[m]["ci95"])
                 else f"{row[m]['mean']:.4g}" for m in metrics]
        lines.append(f"| {row['method']} | {row['setting']} | {row['edits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_axis(runs: list[Run]) -> str:
    """What the curves run along: skip where runs of one method differ in it, else cfg_tgt."""
    skips = {(r.method, r.settings.get("skip")) for r in runs}
    return "skip" if len(skips) > len({r.method for r in runs}) else "cfg_tgt"


def tradeoff_plot(table: list[dict], runs: list[Run], x: str, y: str) -> Image.Image | None:
    """y against x, one curve per method (and per value of the other swept setting) along sweep_axis; None if
    no run has both finite."""
    axis = sweep_axis(runs)
    other = "cfg_tgt" if axis == "skip" else "skip"
    by_run = {r["run"]: r for r in table if r["edit_type"] == "all"}
    curves: dict[str, list[tuple[float, float, float, str]]] = {}
    for run in runs:
        row = by_run[run.name]
        if not (math.isfinite(row[x]["mean"]) and math.isfinite(row[y]["mean"])):
            continue
        varies = len({r.settings.get(other) for r in runs if r.method == run.method}) > 1
        name = run.method + (f" {other.replace('_', '-')} {run.settings.get(other)}" if varies else "")
        order = run.settings.get(axis)
        label = f"{'k' if axis == 'skip' else 'w'}{order:g}" if isinstance(order, (int, float)) else run.name
        curves.setdefault(name, []).append((order if isinstance(order, (int, float)) else 0, row[x]["mean"],
                                            row[y]["mean"], label))
    if not curves:
        return None
    for points in curves.values():
        points.sort(key=lambda p: p[0])
    return line_chart({n: [(p[1], p[2]) for p in pts] for n, pts in curves.items()},
                      f"{y} against {x}, along {axis.replace('_', '-')}", heading(x), heading(y), markers=True,
                      labels={n: [p[3] for p in pts] for n, pts in curves.items()})
