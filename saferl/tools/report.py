"""``saferl report RUN_DIR... [--out report.html]``: one self-contained HTML page about finished
(or running) runs: figures embedded as base64 PNG, videos as base64 GIF/MP4, no script, no
external asset, nothing fetched. Next to it the same numbers as CSV:

    report.html            summary table, evaluation table, one section per task (its algorithms
                           on shared axes), one subsection per group (curves, multipliers,
                           throughput, evaluation, videos)
    report_summary.csv     one row per group
    report_curves.csv      long format: group, algo, task, seed, run_dir, env_steps, metric, value

A group is the runs of one (algorithm, task) whose configs agree apart from the seed, the name,
``run_root`` and ``logging``; its curves are the mean ± std over its runs. Runs of one (algorithm,
task) with other differences form several groups, labelled by the keys that differ.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from saferl.config import ConfigError
from saferl.metric_keys import EPISODE_COST, EPISODE_RETURN, LAGRANGE_MULTIPLIER
from saferl.tools.studies.runner import (
    final_performance,
    format_mean_std,
    plot_mean_std,
    read_curve,
    summarise,
    write_csv,
)

RETURN, COST, THROUGHPUT = EPISODE_RETURN, EPISODE_COST, "time/env_steps_per_s"
# metrics.csv columns plotted as multipliers / dual variables. cgpo/radius, cgpo/dual_lambda and
# cgpo/dual_nu are CGPO's trust region δ̂ and its sub-problem's duals; CGPO's other cgpo/ columns
# (case, ratio test, predicted and actual changes) are diagnostics, not multipliers.
MULTIPLIER_NAMES = (LAGRANGE_MULTIPLIER, "cvpo/eta", "fac/sigma", "fac/k", "fac/n",
                    "cgpo/radius", "cgpo/dual_lambda", "cgpo/dual_nu")
NOT_GROUPING = ("seed", "name", "run_root", "logging")  # config keys a group's runs may differ in
EVAL_FILE = "eval.json"  # written by `saferl eval RUN_DIR --save`
VIDEO_TYPES = {".gif": "image/gif", ".mp4": "video/mp4"}  # RUN_DIR/videos/*, from `saferl eval --video`
MAX_VIDEO_BYTES = 20 * 2 ** 20
SUMMARY_COLUMNS = ["group", "algo", "task", "variant", "runs", "seeds", "cost_limit", "env_steps", "final_points",
                   "return_mean", "return_std", "cost_mean", "cost_std", "violation_rate_mean",
                   "violation_rate_std", "eval_runs", "eval_return_mean", "eval_cost_mean",
                   "eval_violation_rate_mean", "run_dirs"]
CURVE_COLUMNS = ["group", "algo", "task", "seed", "run_dir", "env_steps", "metric", "value"]


@dataclass
class Run:
    path: Path
    algo: str
    task: str
    seed: int
    limit: float
    config: dict  # flattened, without NOT_GROUPING
    series: dict[str, list[tuple[float, float]]]  # metric -> (env steps, value), iterations in order
    curve: tuple[list[float], list[float], list[float]]  # read_curve: env steps, return, cost
    evaluation: dict | None
    videos: list[Path]


@dataclass
class Group:
    algo: str
    task: str
    variant: str
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.algo}/{self.task}" + (f" [{self.variant}]" if self.variant else "")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def is_multiplier(column: str) -> bool:
    return column in MULTIPLIER_NAMES


def read_series(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """Every plotted metric of metrics.csv as (env steps, value) points; an iteration logged twice
    (a resumed run) keeps its last row, as ``read_curve`` does."""
    import csv

    by_iteration: dict[int, dict] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            by_iteration[int(float(row.get("iteration") or len(by_iteration)))] = row
    rows = [by_iteration[k] for k in sorted(by_iteration)]
    columns = [c for c in (rows[0] if rows else {}) if c in (RETURN, COST, THROUGHPUT) or is_multiplier(c)]
    return {c: [(float(r["env_steps"]), float(r[c])) for r in rows if r.get(c) not in (None, "")] for c in columns}


def load_run(path: Path) -> Run:
    from saferl.cluster import rundir

    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"report error: {path} is not a run directory (no config.yaml)")
    if not (path / "metrics.csv").is_file():
        raise ConfigError(f"report error: {path} has no metrics.csv (it has not logged an iteration yet)")
    cfg = rundir.load_run_config(path)
    config = {k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if k.split(".")[0] not in NOT_GROUPING}
    evaluation = None
    if (path / EVAL_FILE).is_file():
        try:
            evaluation = json.loads((path / EVAL_FILE).read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"report error: {path / EVAL_FILE} is not valid JSON") from None
    videos = sorted(p for p in (path / "videos").glob("*") if p.suffix.lower() in VIDEO_TYPES and p.is_file())
    return Run(path, cfg.algo, cfg.task, cfg.seed, cfg.limit, config, read_series(path / "metrics.csv"),
               read_curve(path / "metrics.csv"), evaluation, videos)


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in order of (task, algorithm, variant); a variant names the config keys in which the
    groups of one (algorithm, task) differ."""
    by_pair: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by_pair.setdefault((r.task, r.algo), []).append(r)
    groups = []
    for (task, algo), members in sorted(by_pair.items()):
        configs: dict[str, list[Run]] = {}
        for r in members:
            configs.setdefault(json.dumps(r.config, sort_keys=True), []).append(r)
        differ = sorted({k for r in members for k in r.config if len({m.config.get(k) for m in members}) > 1})
        for key in sorted(configs):
            first = configs[key][0]
            variant = ", ".join(f"{k}={first.config.get(k, '-')}" for k in differ)
            groups.append(Group(algo, task, variant, sorted(configs[key], key=lambda r: (r.seed, str(r.path)))))
    return groups


def final_stats(run: Run) -> dict:
    """A run's final return and cost (``final_performance``: the mean of its last 10% of logged
    points), its violation rate (the share of its logged points whose mean episode cost exceeds
    the limit) and its env steps."""
    _, returns, costs = run.curve
    ret, cost, k = final_performance(returns, costs)
    steps = [s for pts in run.series.values() for s, _ in pts[-1:]]
    return {"return": ret, "cost": cost, "k": k,
            "violation_rate": (sum(c > run.limit for c in costs) / len(costs)) if costs else None,
            "env_steps": max(steps) if steps else 0}


def mean_std(values: list) -> tuple:
    mean, std, _ = summarise(values)
    return mean, std


def summary_row(group: Group) -> dict:
    stats = [final_stats(r) for r in group.runs]
    evals = [r.evaluation for r in group.runs if r.evaluation]
    row = {"group": group.name, "algo": group.algo, "task": group.task, "variant": group.variant,
           "runs": len(group.runs), "seeds": " ".join(str(r.seed) for r in group.runs),
           "cost_limit": " ".join(f"{x:g}" for x in sorted({r.limit for r in group.runs})),
           "env_steps": " ".join(str(int(x)) for x in sorted({s["env_steps"] for s in stats})),
           "final_points": " ".join(str(x) for x in sorted({s["k"] for s in stats})),
           "run_dirs": " ".join(str(r.path) for r in group.runs), "eval_runs": len(evals)}
    for key in ("return", "cost", "violation_rate"):
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std([s[key] for s in stats])
    for key in ("return", "cost", "violation_rate"):
        row[f"eval_{key}_mean"] = mean_std([e.get(f"{key}_mean" if key != "violation_rate" else key) for e in evals])[0]
    return row


def curve_rows(group: Group) -> list[dict]:
    return [{"group": group.name, "algo": group.algo, "task": group.task, "seed": r.seed, "run_dir": str(r.path),
             "env_steps": int(x), "metric": metric, "value": y}
            for r in group.runs for metric, pts in r.series.items() for x, y in pts]


# ---- figures ---------------------------------------------------------------------------------

def color(i: int):
    import matplotlib.pyplot as plt

    return plt.get_cmap("tab10")(i % 10)


def plot_metric(ax, groups: list[tuple[Group, int]], metric: str, label=None) -> bool:
    """Mean ± std over each group's runs of ``metric`` against env steps; False if none has it."""
    import numpy as np

    drawn = False
    for g, i in groups:
        curves = [np.array(r.series[metric]) for r in g.runs if r.series.get(metric)]
        if curves:
            plot_mean_std(ax, curves, color(i), label or g.name)
            drawn = True
    ax.set_xlabel("env steps")
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
    return drawn


def limit_lines(ax, groups: list[tuple[Group, int]]) -> None:
    for n, limit in enumerate(sorted({r.limit for g, _ in groups for r in g.runs})):
        ax.axhline(limit, color="red", linestyle="--", linewidth=1, label="cost limit" if n == 0 else None)


def figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:panels])


def png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def curves_figure(groups: list[tuple[Group, int]], with_throughput: bool) -> str:
    """Return and cost (with the cost limit) against env steps; throughput too when asked."""
    metrics = [RETURN, COST] + ([THROUGHPUT] if with_throughput else [])
    fig, axes = figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        plot_metric(ax, groups, metric)
        if metric == COST:
            limit_lines(ax, groups)
        if ax.get_legend_handles_labels()[0]:  # a run with no finished episode has no curve
            ax.legend(fontsize=7)
    return png(fig)


def columns_of(groups: list[tuple[Group, int]], keep) -> list[str]:
    seen = []
    for g, _ in groups:
        for r in g.runs:
            seen += [c for c, pts in r.series.items() if pts and keep(c) and c not in seen]
    return seen


def multipliers_figure(group: Group, i: int) -> str | None:
    cols = columns_of([(group, i)], is_multiplier)
    if not cols:
        return None
    fig, axes = figure(len(cols))
    for ax, col in zip(axes, cols):
        plot_metric(ax, [(group, i)], col, label=col)
    return png(fig)


def throughput_figure(group: Group, i: int) -> str | None:
    if not columns_of([(group, i)], lambda c: c == THROUGHPUT):
        return None
    fig, axes = figure(1)
    plot_metric(axes[0], [(group, i)], THROUGHPUT, label="env steps/s")
    return png(fig)


# ---- HTML ------------------------------------------------------------------------------------

CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f2f2f2}td.num{text-align:right}figure{margin:8px 0}figcaption{font-size:12px;color:#555}
img.figure{max-width:100%}img.video,video{max-width:480px;border:1px solid #ccc}h2{border-bottom:1px solid #ddd}"""


def esc(x) -> str:
    return html.escape(str(x))


def table(header: list[str], rows: list[list], cls: str) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def img(b64: str, caption: str) -> str:
    return (f'<figure><img class="figure" alt="{esc(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def summary_table(groups: list[Group]) -> str:
    rows = []
    for g in groups:
        stats = [final_stats(r) for r in g.runs]
        s = summary_row(g)
        rows.append([g.name, s["seeds"], s["env_steps"], s["cost_limit"],
                     format_mean_std([x["return"] for x in stats]), format_mean_std([x["cost"] for x in stats]),
                     format_mean_std([x["violation_rate"] for x in stats], ".0%")])
    return table(["group", "seeds", "env steps", "cost limit", "final return", "final cost", "violation rate"],
                 rows, "summary")


def eval_table(runs: list[Run]) -> str:
    def pm(e: dict, key: str) -> str:
        mean, std = e.get(f"{key}_mean"), e.get(f"{key}_std")
        return "-" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")

    rows = []
    for r in runs:
        e, rate = r.evaluation, r.evaluation.get("violation_rate")
        rows.append([f"{r.algo}/{r.task}", r.seed, e.get("iteration", "-"), e.get("episodes", "-"), pm(e, "return"),
                     pm(e, "cost"), "-" if rate is None else f"{rate:.0%}", r.path.name])
    return table(["run", "seed", "iteration", "episodes", "return", "cost", "violation rate", "run dir"],
                 rows, "evaluation")


def videos_html(runs: list[Run]) -> str:
    parts = []
    for r in runs:
        for v in r.videos:
            caption = f"{r.path.name}/videos/{v.name}"
            if v.stat().st_size > MAX_VIDEO_BYTES:
                parts.append(f"<p>{esc(caption)}: left out ({v.stat().st_size / 2 ** 20:.0f} MiB)</p>")
                continue
            data = f"data:{VIDEO_TYPES[v.suffix.lower()]};base64,{base64.b64encode(v.read_bytes()).decode()}"
            media = (f'<img class="video" alt="{esc(caption)}" src="{data}">' if v.suffix.lower() == ".gif"
                     else f'<video controls src="{data}"></video>')
            parts.append(f"<figure>{media}<figcaption>{esc(caption)}</figcaption></figure>")
    return "<h4>Videos</h4>" + "".join(parts) if parts else ""


def group_section(g: Group, i: int) -> str:
    out = [f'<h3 id="{esc(g.name)}">{esc(g.name)}</h3>',
           f"<p>{len(g.runs)} run(s), seeds {esc(' '.join(str(r.seed) for r in g.runs))}: "
           f"{esc(', '.join(str(r.path) for r in g.runs))}</p>",
           img(curves_figure([(g, i)], False), f"{g.name}: episode return and cost (mean ± std over seeds)")]
    if (m := multipliers_figure(g, i)) is not None:
        out.append(img(m, f"{g.name}: multipliers / dual variables"))
    if (t := throughput_figure(g, i)) is not None:
        out.append(img(t, f"{g.name}: throughput (env steps/s)"))
    evaluated = [r for r in g.runs if r.evaluation]
    if evaluated:
        out.append("<h4>Evaluation</h4>" + eval_table(evaluated))
    out.append(videos_html(g.runs))
    return "\n".join(out)


def task_section(task: str, members: list[tuple[Group, int]]) -> str:
    out = [f'<h2 id="task-{esc(task)}">{esc(task)}</h2>']
    if len(members) > 1:
        fig = curves_figure(members, bool(columns_of(members, lambda c: c == THROUGHPUT)))
        out.append(img(fig, f"{task}: {', '.join(g.name for g, _ in members)} on shared axes"))
    out += [group_section(g, i) for g, i in members]
    return "\n".join(out)


def render(groups: list[Group], runs: list[Run]) -> str:
    indexed = list(zip(groups, range(len(groups))))
    tasks = sorted({g.task for g in groups})
    body = [f"<h1>saferl report</h1><p>{len(runs)} run(s) in {len(groups)} group(s), written "
            f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))}. Final values: the mean of each run's last 10% of "
            "logged points, then mean ± std over the group's runs; violation rate: the share of logged "
            "points whose mean episode cost exceeds the cost limit.</p>",
            "<h2>Summary</h2>", summary_table(groups)]
    evaluated = [r for g in groups for r in g.runs if r.evaluation]
    if evaluated:
        body += ["<h2>Evaluation</h2>", eval_table(evaluated)]
    body += [task_section(t, [(g, i) for g, i in indexed if g.task == t]) for t in tasks]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>saferl report</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build_report(run_dirs: list, out: Path = Path("report.html")) -> dict[str, Path]:
    """Write the HTML report and its two CSVs; returns their paths."""
    if not run_dirs:
        raise ConfigError("usage error: saferl report needs at least one RUN_DIR")
    seen, runs = set(), []
    for p in run_dirs:
        if Path(p).resolve() not in seen:
            seen.add(Path(p).resolve())
            runs.append(load_run(Path(p)))
    groups = group_runs(runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"html": out, "summary": out.parent / "report_summary.csv", "curves": out.parent / "report_curves.csv"}
    write_csv(paths["summary"], SUMMARY_COLUMNS, [summary_row(g) for g in groups])
    write_csv(paths["curves"], CURVE_COLUMNS, [row for g in groups for row in curve_rows(g)])
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(render(groups, runs))
    tmp.replace(out)
    return paths


def write_run_report(run_dir: Path) -> dict[str, Path]:
    """What ``saferl train`` leaves at the end of a run: ``RUN_DIR/report.html`` (with its CSVs,
    as ``saferl report RUN_DIR``) and ``RUN_DIR/curves.png``, return and cost against env steps
    with the cost limit drawn."""
    run_dir = Path(run_dir)
    paths = build_report([run_dir], run_dir / "report.html")
    group = group_runs([load_run(run_dir)])[0]
    paths["png"] = run_dir / "curves.png"
    paths["png"].write_bytes(base64.b64decode(curves_figure([(group, 0)], with_throughput=False)))
    return paths
