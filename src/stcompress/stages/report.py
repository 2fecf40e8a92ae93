"""`stcompress report RUN_DIR`: render what the stages of a run wrote into report.md and report.html.

Nothing is recomputed: rows come from evaluate outputs' scores.json (scores with their sacrebleu
signatures, the model's layers, true parameters, bytes on disk, speed), the heatmap is the PNG the
importance stage drew. Plots are PNG files beside report.md and embedded (base64) in report.html,
so the HTML is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stcompress.artifacts import MANIFEST, atomic_write_bytes, atomic_write_json, atomic_write_text, build_manifest, path_identity, staged_output
from stcompress.config import ReportConfig, to_dict
from stcompress.errors import StcompressError
from stcompress.languages import default_selection_metric, language_name
from stcompress.outputs import claims_output

log = logging.getLogger(__name__)

# The IWSLT compression track's storage bins (bytes on disk), smallest first.
STORAGE_BINS = ((0, 200e6, "<200 MB"), (200e6, 500e6, "200-500 MB"), (500e6, 1e9, "0.5-1 GB"),
                (1e9, 2e9, "1-2 GB"), (2e9, 4e9, "2-4 GB"))
METRICS = (("bleu", "BLEU"), ("chrf", "chrF"), ("chrf++", "chrF++"), ("comet", "COMET"))


@dataclass
class Row:
    """One evaluate output, as it was written."""

    name: str
    lang: str
    scores: dict[str, dict[str, Any]]
    model: dict[str, Any]
    speed: dict[str, Any]
    segments: int
    skipped: int = 0  # segments the evaluation could not score (unreadable audio, ...)
    layers_removed: int | None = None
    percent: dict[str, float] = field(default_factory=dict)
    split: str | None = None  # what the evaluate stage translated: data.subset, or the dataset's name for "all"

    def score(self, metric: str) -> float | None:
        s = self.scores.get(metric)
        return None if s is None else float(s["score"])


def stage_dirs(run_dir: Path, skip: Path | None) -> list[Path]:
    """Finished stage outputs, in the run's order (plan.json) when there is one."""
    found = {p.name: p for p in sorted(run_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")
             and (p / MANIFEST).is_file() and (skip is None or p.resolve() != skip.resolve())}
    plan = run_dir / "plan.json"
    order = json.loads(plan.read_text(encoding="utf-8")).get("order", []) if plan.is_file() else []
    return [found[n] for n in order if n in found] + [p for n, p in found.items() if n not in order]


def read_rows(dirs: list[Path]) -> list[Row]:
    rows = []
    for d in dirs:
        if not (d / "scores.json").is_file():
            continue
        s = json.loads((d / "scores.json").read_text(encoding="utf-8"))
        config = json.loads((d / MANIFEST).read_text(encoding="utf-8")).get("config") or {} if (d / MANIFEST).is_file() else {}
        data = {} if config.get("hypotheses") else config.get("data") or {}
        split = data.get("subset") if data.get("subset") not in (None, "all") else (  # dev.jsonl, builtin:demo-dev -> dev, demo-dev
            Path(str(data["dataset"]).rsplit(":", 1)[-1]).stem if data.get("dataset") else None)
        rows.append(Row(name=d.name, lang=s["target_lang"], scores=s.get("scores") or {}, model=s.get("model") or {},
                        speed=s.get("speed") or {}, segments=s.get("segments", 0), skipped=s.get("segments_skipped") or 0,
                        split=split))
    return rows


def groups(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows per language, and per data subset where one language was evaluated on several (a sweep's
    dev and test): scores of different segments never share a table, a percentage or a frontier."""
    out: dict[str, list[Row]] = {}
    for lang in dict.fromkeys(r.lang for r in rows):
        group = [r for r in rows if r.lang == lang]
        splits = list(dict.fromkeys(r.split for r in group))
        for split in splits:
            key = lang if len(splits) == 1 else f"{lang}-{split or 'scored'}"
            out[key] = [r for r in group if r.split == split]
    return out


def relate(rows: list[Row], teacher: str | None) -> dict[str, Row]:
    """Fill layers removed (against the deepest model evaluated) and % of the teacher; teacher per language."""
    if teacher and not any(r.name == teacher for r in rows):
        raise StcompressError(f"teacher: no evaluate output named {teacher!r}; choose one of {', '.join(r.name for r in rows)}")
    teachers = {}
    for key, group in groups(rows).items():
        ref = next((r for r in group if r.name == teacher), None) or next((r for r in group if "teacher" in r.name), group[0])
        teachers[key] = ref
        depth = max((r.model.get("decoder_layers") or 0) for r in group)
        for r in group:
            if r.model.get("decoder_layers"):
                r.layers_removed = depth - r.model["decoder_layers"]
            for metric, _ in METRICS:
                mine, base = r.score(metric), ref.score(metric)
                if mine is not None and base:
                    r.percent[metric] = 100 * mine / base
    return teachers


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def table(rows: list[Row], teacher: Row) -> tuple[list[str], list[list[str]]]:
    primary = default_selection_metric(teacher.lang)
    present = [(m, label) for m, label in METRICS if any(r.score(m) is not None for r in rows)]
    head = ["model / stage", "LM layers", "removed", "parameters", "bytes on disk", *(label for _, label in present),
            f"% of teacher ({dict(METRICS)[primary]})", *(["% of teacher (COMET)"] if any(r.score("comet") is not None for r in rows) else []),
            "segments/s"]
    body = []
    for r in rows:
        cells = [r.name + (" (teacher)" if r is teacher else ""), _fmt(r.model.get("decoder_layers"), "d"),
                 _fmt(r.layers_removed, "d"), _fmt(r.model.get("parameters"), ","), _size(r.model.get("bytes_on_disk"))]
        cells += [_fmt(r.score(m)) for m, _ in present]
        cells.append(_fmt(r.percent.get(primary), ".1f"))
        if "% of teacher (COMET)" in head:
            cells.append(_fmt(r.percent.get("comet"), ".1f"))
        cells.append(_fmt(r.speed.get("segments_per_s"), ".3g"))
        body.append(cells)
    return head, body


def quality_metric(rows: list[Row]) -> str:
    """COMET when every row has it (how the track ranks), else the paper's chrF / chrF++."""
    if rows and all(r.score("comet") is not None for r in rows):
        return "comet"
    return default_selection_metric(rows[0].lang)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both size (smaller) and quality (higher)."""
    return [i for i, (b, q) in enumerate(points)
            if not any((b2 <= b and q2 >= q) and (b2 < b or q2 > q) for b2, q2 in points)]


def storage_bin(n: int) -> str:
    """The track's storage bin of a size in bytes; a bin's upper edge is in it (exactly 2 GB: 1-2 GB)."""
    return next((label for _, hi, label in STORAGE_BINS if n <= hi), "> 4 GB")


def frontier(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """Per (bytes, quality) point: on the Pareto frontier; a point missing either value is not."""
    known = [i for i, (b, q) in enumerate(points) if b is not None and q is not None]
    front = {known[j] for j in pareto([points[i] for i in known])}  # type: ignore[misc]
    return [i in front for i in range(len(points))]


SWEEP_NOTE = ("Bytes: the sum of the candidate's *.safetensors files and torch.save(model.state_dict()) of it reloaded, "
              "as its export measured them; bins are the IWSLT 2025 storage bins (10^9-byte GB). Frontier: no other "
              "candidate is at most as large and at least as good on that split, and better on one of the two.")


def sweep_table(run_dir: Path, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Every candidate of <run_dir>/sweep.json: precision, measured bytes, bin, dev and test scores, frontier marks."""
    cands = json.loads((run_dir / "sweep.json").read_text(encoding="utf-8"))["candidates"]
    by_name = {r.name: r for r in rows}
    sizes = []
    for c in cands:
        manifest = run_dir / c["name"] / MANIFEST
        sizes.append((json.loads(manifest.read_text(encoding="utf-8")).get("measured_bytes") if manifest.is_file() else None) or {})
    head = ["candidate", "LM layers", "precision", "vocabulary", "*.safetensors", "torch.save", "bin"]
    body = [[c["name"], str(c["kept_layers"]), c["precision"], "trimmed" if c.get("trim") else "full",
             _size(size.get("safetensors")), _size(size.get("torch_save")),
             storage_bin(size["safetensors"]) if size.get("safetensors") else "-"] for c, size in zip(cands, sizes)]
    if any(c.get("input") for c in cands):  # a sweep of several models (`inputs`): which one each candidate is made from
        head.insert(1, "input")
        for cells, c in zip(body, cands):
            cells.insert(1, c["input"] or f"input ({Path(c['input_path']).name})")
    for split in ("dev", "test"):
        scored = [by_name[c[split]] for c in cands if c[split] in by_name]
        if not scored:
            continue
        metric = quality_metric(scored)
        present = [(m, label) for m, label in METRICS[1:] if any(r.score(m) is not None for r in scored)]
        head += [f"{split} {label}" for _, label in present] + [f"{split} frontier ({dict(METRICS)[metric]})"]
        rows_of = [by_name.get(c[split]) for c in cands]
        marks = frontier([(size.get("safetensors"), r.score(metric) if r else None) for size, r in zip(sizes, rows_of)])
        for cells, r, mark in zip(body, rows_of, marks):
            cells += [_fmt(r.score(m) if r else None) for m, _ in present] + ["★" if mark else ""]
    return head, body


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg): PNG bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_layers(rows: list[Row], metric: str) -> bytes | None:
    points = [r for r in rows if r.layers_removed is not None and r.score(metric) is not None]
    if not points:
        return None
    plt, fig, ax = _figure()
    ax.scatter([r.layers_removed for r in points], [r.score(metric) for r in points], color="tab:blue", zorder=3)
    for r in points:
        ax.annotate(r.name, (r.layers_removed, r.score(metric)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("LM decoder layers removed")
    ax.set_ylabel(dict(METRICS)[metric])
    ax.set_title(f"{language_name(points[0].lang)}: quality vs layers removed")
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def plot_size(rows: list[Row], metric: str) -> bytes | None:
    points = [r for r in rows if r.model.get("bytes_on_disk") and r.score(metric) is not None]
    if not points:
        return None
    plt, fig, ax = _figure()
    xs = [r.model["bytes_on_disk"] / 1e9 for r in points]
    ys = [r.score(metric) for r in points]
    lo, hi = min(xs + [0.1]) / 1.5, max(xs + [4.0]) * 1.5
    for i, (a, b, label) in enumerate(STORAGE_BINS):  # the track's storage bins
        ax.axvspan(max(a / 1e9, lo), b / 1e9, color="tab:green" if i % 2 else "tab:olive", alpha=0.08)
        ax.text((max(a / 1e9, lo) * b / 1e9) ** 0.5, 0.98, label, transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="dimgray")
    ax.axvspan(4.0, hi, color="lightgray", alpha=0.25)
    ax.text((4.0 * hi) ** 0.5, 0.98, "> 4 GB", transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7)
    front = sorted(pareto(list(zip(xs, ys))), key=lambda i: xs[i])
    ax.scatter(xs, ys, color="tab:blue", zorder=3, label="models")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="tab:red", zorder=4, label="Pareto front")
    for r, x, y in zip(points, xs, ys):
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.margins(y=0.2)  # room for the bin labels above the best point
    ax.set_xlabel("bytes on disk (GB, log scale)")
    ax.set_ylabel(dict(METRICS)[metric])
    ax.set_title(f"{language_name(points[0].lang)}: quality vs size on disk")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _png(plt, fig)


# ---------------------------------------------------------------------------------------------
# Rendering


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _segments(rows: list[Row]) -> str:
    skipped = [f"{r.name} {r.skipped}" for r in rows if r.skipped]
    return f"{rows[0].segments} segments scored" + (f" (skipped, not scored: {', '.join(skipped)})" if skipped else "")


def _signatures(rows: list[Row]) -> list[str]:
    sigs = {f"{m}: {s['signature']}" for r in rows for m, s in r.scores.items() if s.get("signature")}
    return sorted(sigs)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #eee;margin:.5em 0}code{font-size:12px;color:#555}")


def render(cfg: ReportConfig, run_dir: Path, out: Path, dirs: list[Path]) -> dict[str, Any]:
    rows = read_rows(dirs)
    teachers = relate(rows, cfg.teacher)
    title = cfg.title or f"stcompress report: {run_dir.resolve().name}"
    md = [f"# {title}", "", f"Rendered from the stage outputs in `{run_dir}` (nothing recomputed).", ""]
    body = [f"<h1>{html.escape(title)}</h1><p>Rendered from the stage outputs in <code>{html.escape(str(run_dir))}</code> "
            "(nothing recomputed).</p>"]
    images: list[str] = []

    def add_image(name: str, data: bytes, caption: str) -> None:
        atomic_write_bytes(out / name, data)
        images.append(name)
        md.extend([f"![{caption}]({name})", ""])
        body.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,"
                    f"{base64.b64encode(data).decode()}'><figcaption>{html.escape(caption)}</figcaption></figure>")

    by_group = groups(rows)
    for lang, teacher in teachers.items():
        group = by_group[lang]
        head, cells = table(group, teacher)
        name = language_name(teacher.lang) + (f", {teacher.split or 'scored'} split" if lang != teacher.lang else "")
        md.extend([f"## English -> {name} ({teacher.lang})", "", _md_table(head, cells), "",
                   f"{_segments(group)}. Signatures:", "", *[f"- `{s}`" for s in _signatures(group)], ""])
        body.append(f"<h2>English &rarr; {html.escape(name)} ({teacher.lang})</h2>{_html_table(head, cells)}"
                    f"<p>{html.escape(_segments(group))}. Signatures:</p><ul>"
                    + "".join(f"<li><code>{html.escape(s)}</code></li>" for s in _signatures(group)) + "</ul>")
        metric = quality_metric(group)
        if (png := plot_layers(group, metric)) is not None:
            add_image(f"quality_vs_layers_{lang}.png", png, f"{name}: {dict(METRICS)[metric]} vs LM layers removed")
        if (png := plot_size(group, metric)) is not None:
            add_image(f"quality_vs_size_{lang}.png", png, f"{name}: {dict(METRICS)[metric]} vs bytes on disk "
                      "(red: Pareto front; bands: IWSLT storage bins)")
    if (run_dir / "sweep.json").is_file():
        head, cells = sweep_table(run_dir, rows)
        md.extend(["## Pareto sweep: every candidate", "", _md_table(head, cells), "", SWEEP_NOTE, ""])
        body.append(f"<h2>Pareto sweep: every candidate</h2>{_html_table(head, cells)}<p>{html.escape(SWEEP_NOTE)}</p>")
    for d in dirs:
        if (d / "heatmap.png").is_file():
            order = json.loads((d / "removal_order.json").read_text(encoding="utf-8")) if (d / "removal_order.json").is_file() else {}
            caption = f"{d.name}: layer-importance heatmap" + (f"; removal order {order.get('removal_order')} ({order.get('metric')})" if order else "")
            md.extend([f"## Layer importance ({d.name})", ""])
            body.append(f"<h2>Layer importance ({html.escape(d.name)})</h2>")
            add_image(f"heatmap_{d.name}.png", (d / "heatmap.png").read_bytes(), caption)
    if stages := plan_rows(run_dir, Path(cfg.output) if cfg.output else run_dir / "report"):
        head = ["stage", "type", "status", "seconds"]
        md.extend(["## Stages (plan.json)", "", _md_table(head, stages), ""])
        body.append(f"<h2>Stages (plan.json)</h2>{_html_table(head, stages)}")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                      f"</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return {"rows": [{"name": r.name, "target_lang": r.lang, "layers_removed": r.layers_removed, "percent_of_teacher": r.percent}
                     for r in rows], "teachers": {k: v.name for k, v in teachers.items()}, "images": images}


def plan_rows(run_dir: Path, output: Path) -> list[list[str]]:
    """Each stage's status and wall time, as `stcompress run` recorded them (this report left out)."""
    path = run_dir / "plan.json"
    if not path.is_file():
        return []
    plan = json.loads(path.read_text(encoding="utf-8"))
    stages = {n: r for n, r in plan.get("stages", {}).items()
              if Path(r.get("output", n)).resolve() != output.resolve()}
    return [[n, stages[n].get("stage", "-"), stages[n].get("status", "-"), _fmt(stages[n].get("seconds"), ".1f")]
            for n in plan.get("order", stages) if n in stages]


@claims_output(lambda cfg: cfg.output or Path(cfg.run_dir) / "report")
def run(cfg: ReportConfig, *, progress: bool = True) -> Path:
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise StcompressError(f"run_dir: {run_dir} is not a directory; give a `stcompress run` directory")
    output = Path(cfg.output) if cfg.output else run_dir / "report"
    dirs = stage_dirs(run_dir, skip=output)
    if not any((d / "scores.json").is_file() for d in dirs):
        # An empty report that exits 0 reads as "done"; in `stcompress run` the report stage fails the same way.
        found = ", ".join(d.name for d in dirs) or "no finished stage outputs"
        raise StcompressError(f"run_dir: {run_dir} holds no evaluate output (scores.json) to report (found: {found}); "
                              "run an evaluate stage first (nothing was written)")
    with staged_output(output) as out:
        summary = render(cfg, run_dir, out, dirs)
        inputs = {d.name: path_identity(d / MANIFEST) for d in dirs}
        atomic_write_json(out / MANIFEST, build_manifest("report", to_dict(cfg), inputs, {"total": time.perf_counter() - t0}, **summary))
    log.info("report: %d evaluated models -> %s", len(summary["rows"]), output / "report.html")
    return output
