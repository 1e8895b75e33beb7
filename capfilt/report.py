"""`capfilt report`: one static HTML page a person opens after a run.

It reads only what rounds leave on disk (``*.scores.parquet``, ``summary.json``, ``eval.json``, and the
demo world's ``truth.parquet`` when there is one), so it works on any finished run or bootstrap folder
without a model. Images are embedded as data URIs: the page is a single file that can be mailed.
A run's scores files are read one at a time, as columns: the histograms keep bin counts and the examples
the first rows they need, so a report on a corpus-sized run does not hold its rows.
"""

from __future__ import annotations

import base64
import functools
import html
import math
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.data.reader import read_shard
from capfilt.data.sample import Reject, Sample
from capfilt.errors import UserError
from capfilt.eval.filtering import read_labels
from capfilt.run.ledger import MANIFEST, SUMMARY, read_json

HIST_BINS = 20
EXAMPLES = 12


@dataclass
class RoundView:
    """What the page shows of one round: its table row and the folder of its cleaning run, if any."""

    name: str
    row: dict
    run_dir: Path | None


def _load_json(path: str | Path) -> dict:
    return read_json(str(path)) or {}


def _rounds(root: Path) -> list[RoundView]:
    """A bootstrap folder (round-*/) or a single `capfilt run` folder."""
    round_dirs = sorted(p for p in root.glob("round-*") if p.is_dir())
    if not round_dirs:
        if not any((root / name).is_file() for name in (MANIFEST, SUMMARY)):  # begun, finished
            raise UserError(f"{root}: neither a bootstrap folder (round-*/) nor a capfilt run folder")
        return [RoundView(root.name, round_row(root), root)]
    views = []
    for d in round_dirs:
        run_dir = d / "run" if (d / "run").is_dir() else None
        views.append(RoundView(d.name, round_row(d), run_dir))
    return views


def round_row(round_dir: str | Path) -> dict:
    """The per-round table row: the round's models on the test split, and the cleaning of its run.
    ``round_dir`` is a local folder or a URL."""
    ev = _load_json(f"{round_dir}/eval.json")
    summary = _load_json(f"{round_dir}/run/summary.json") or _load_json(f"{round_dir}/summary.json")
    flt = ev.get("filtering", {})
    ret = ev.get("retrieval", {})
    cap = ev.get("captioning", {})
    kept = summary.get("kept_rate_by_source", {})
    threshold = summary.get("threshold")
    return {
        "threshold": None
        if threshold is None
        else f"{threshold:.3f} {summary.get('threshold_mode', 'fixed')}",
        "filter P": flt.get("precision"),
        "filter R": flt.get("recall"),
        "filter F1": flt.get("f1"),
        "TR@1": ret.get("tr@1"),
        "IR@1": ret.get("ir@1"),
        "TR@5": ret.get("tr@5"),
        "IR@5": ret.get("ir@5"),
        "BLEU-4": cap.get("bleu4"),
        "CIDEr": cap.get("cider"),
        "attr acc": cap.get("attribute_accuracy"),
        "kept web": kept.get("web"),
        "kept synthetic": kept.get("synthetic"),
    }


def round_table(round_dirs: list[str]) -> str:
    """The table of a bootstrap's rounds (local folders or URLs), each named by its folder."""
    return format_table([(posixpath.basename(str(d).rstrip("/")), round_row(d)) for d in round_dirs])


def format_table(rows: list[tuple[str, dict]]) -> str:
    """The round table as fixed-width text (printed by `make demo`)."""
    if not rows:
        return "(no rounds)"
    cols = list(rows[0][1])
    head = f"{'round':<10}" + "".join(f"{c:>15}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, row in rows:
        lines.append(f"{name:<10}" + "".join(f"{_fmt(row.get(c)):>15}" for c in cols))
    return "\n".join(lines)


def _fmt(v, places: int = 3) -> str:
    """A number for people; a missing one (None or NaN: no ITC with ``filter.itc: false``) as —."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{places}f}" if isinstance(v, float) else str(v)


def _truth(root: Path, truth: Path | None) -> dict[str, dict]:
    """key → web label row, from --truth (or any labels file) or the one recorded in the bootstrap manifest."""
    path = truth or _load_json(root / "manifest.json").get("truth")
    if not path or not Path(path).is_file():
        return {}
    return {r["key"]: r for r in read_labels(path)}


def bin_counts(values: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """How many ITM probabilities in [0, 1] fall in each of ``bins`` equal bins (1.0 in the last; a
    missing score, NaN, in none)."""
    values = values[~np.isnan(values)]
    return np.bincount(np.minimum((values * bins).astype(np.int64), bins - 1), minlength=bins)


def histogram_svg(counts: dict[str, np.ndarray], title: str) -> str:
    """Overlaid step histograms (:func:`bin_counts` per group), one colour per group, as inline SVG."""
    width, height, pad = 420, 180, 28
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    bins = len(next(iter(counts.values())))
    top = max([int(c.max()) for c in counts.values() if len(c)] + [1])
    bw = (width - 2 * pad) / bins
    parts = [
        f'<svg class="hist" width="{width}" height="{height + 40}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad}" y="14" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{pad}" y1="{height}" x2="{width - pad}" y2="{height}" stroke="#333"/>',
        f'<line x1="{pad + bins * bw / 2}" y1="20" x2="{pad + bins * bw / 2}" y2="{height}" '
        'stroke="#999" stroke-dasharray="4"/>',
    ]
    for i, (name, c) in enumerate(counts.items()):
        colour = colours[i % len(colours)]
        points = []
        for b, n in enumerate(c.tolist()):
            y = height - (height - 24) * n / top
            points += [f"{pad + b * bw:.1f},{y:.1f}", f"{pad + (b + 1) * bw:.1f},{y:.1f}"]
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}"/>'
        )
        parts.append(
            f'<text x="{pad + 10 + 150 * i}" y="{height + 34}" font-size="12" fill="{colour}">'
            f"{html.escape(name)} (n={int(c.sum())})</text>"
        )
    for tick in (0.0, 0.5, 1.0):
        parts.append(
            f'<text x="{pad + tick * bins * bw - 8:.0f}" y="{height + 16}" font-size="11">{tick}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


WEB, SYNTHETIC, BY_TRUTH = "ITM, web captions", "ITM, synthetic captions", "ITM, web captions by ground truth"


class RunScores:
    """What the page shows of a run's ``*.scores.parquet``, folded a file at a time: ITM bin counts per
    figure and group, and the first ``examples`` kept and dropped rows."""

    def __init__(self, truth: dict[str, dict], examples: int = EXAMPLES):
        self.examples, self.rows = examples, 0
        self.kept: list[dict] = []
        self.dropped: list[dict] = []
        self.truth_keys = {  # the web-by-truth figure's groups: keys labelled clean, and noisy
            group: pa.array(
                [k for k, t in truth.items() if bool(t["noisy"]) == (group == "noisy")], pa.string()
            )
            for group in ("clean", "noisy")
            if truth
        }
        figures = {WEB: ("kept", "dropped"), SYNTHETIC: ("kept", "dropped")}
        if self.truth_keys:
            figures[BY_TRUTH] = tuple(self.truth_keys)
        self.counts = {
            title: {g: np.zeros(HIST_BINS, np.int64) for g in groups} for title, groups in figures.items()
        }

    def add(self, table: pa.Table) -> None:
        """One scores file's rows."""
        self.rows += table.num_rows
        cands = table.column("candidates").combine_chunks()
        flat = cands.flatten()
        itm = flat.field("itm").to_numpy(zero_copy_only=False)
        kept = flat.field("kept").to_numpy(zero_copy_only=False)
        source = flat.field("source").to_numpy(zero_copy_only=False)
        web, syn = source == "web", source == "synthetic"
        for title, mask in ((WEB, web), (SYNTHETIC, syn)):
            self._count(title, "kept", itm[mask & kept])
            self._count(title, "dropped", itm[mask & ~kept])
        if self.truth_keys:
            keys = pc.take(table.column("key").combine_chunks(), cands.value_parent_indices())
            for group, known in self.truth_keys.items():
                in_group = pc.is_in(keys, value_set=known).to_numpy(zero_copy_only=False)
                self._count(BY_TRUTH, group, itm[web & in_group])
        if len(self.kept) < self.examples or len(self.dropped) < self.examples:
            for row in table.to_pylist():
                chosen = self.kept if row["kept"] else self.dropped
                if len(chosen) < self.examples:
                    chosen.append(row)

    def _count(self, title: str, group: str, values: np.ndarray) -> None:
        self.counts[title][group] += bin_counts(values)

    def histograms(self) -> str:
        return "\n".join(histogram_svg(groups, title) for title, groups in self.counts.items())

    def chosen(self) -> list[dict]:
        """Up to ``examples`` rows, kept ones first, half of them when there are enough dropped ones."""
        n = self.examples
        half = min(len(self.kept), max(n // 2, n - len(self.dropped)))
        return self.kept[:half] + self.dropped[: n - half]


def run_scores(run_dir: Path, truth: dict[str, dict]) -> RunScores:
    scores = RunScores(truth)
    for path in sorted(run_dir.glob("*.scores.parquet")):
        scores.add(pq.read_table(path))
    return scores


def _example_samples(chosen: list[dict]) -> list[tuple[dict, Sample]]:
    """The chosen scored rows with their images, re-read from the input shards."""
    by_shard: dict[str, set[str]] = {}
    for r in chosen:
        by_shard.setdefault(r["shard"], set()).add(r["key"])
    images: dict[str, Sample] = {}
    for shard, keys in by_shard.items():
        images.update(read_shard(shard, functools.partial(_samples, keys=keys)))
    return [(r, images[r["key"]]) for r in chosen if r["key"] in images]


def _samples(items: Iterable[Sample | Reject], keys: set[str]) -> dict[str, Sample]:
    return {i.key: i for i in items if isinstance(i, Sample) and i.key in keys}


def _example_card(row: dict, sample: Sample, truth: dict[str, dict]) -> str:
    mime = {"jpg": "jpeg"}.get(sample.image_ext, sample.image_ext)
    src = f"data:image/{mime};base64,{base64.b64encode(sample.image).decode()}"
    lines = []
    for c in row["candidates"]:
        mark = "kept" if c["kept"] else "dropped"
        lines.append(
            f'<li class="{mark}"><b>{c["source"]}</b> {html.escape(c["text"])} '
            f"<span>ITM {_fmt(c['itm'], 2)} · ITC {_fmt(c['itc'], 2)} · {mark}</span></li>"
        )
    t = truth.get(row["key"])
    label = ("noisy" + (f" ({t['noise_type']})" if t["noise_type"] else "")) if t and t["noisy"] else "clean"
    note = f'<div class="truth">truth: {label}</div>' if t else ""
    decision = "kept" if row["kept"] else "dropped"
    return (
        f'<figure class="example {decision}"><img src="{src}" alt="{html.escape(row["key"])}">'
        f"<figcaption><code>{html.escape(row['key'])}</code> — {decision}{note}<ul>{''.join(lines)}</ul>"
        "</figcaption></figure>"
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>capfilt report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }}
figure {{ margin: 0; border: 2px solid #ccc; padding: 6px; }} figure.kept {{ border-color: #2ca02c; }}
figure.dropped {{ border-color: #d62728; }} img {{ width: 128px; height: 128px; image-rendering: pixelated; }}
li.dropped {{ color: #999; }} li span {{ font-size: 0.8em; color: #555; }} .truth {{ font-size: 0.85em; }}
#status {{ font-size: 0.8em; color: #555; }}
</style></head><body>
<h1>capfilt report: {title}</h1>
<p>Per round: the round's captioner and filter evaluated on the held-out test split (retrieval R@k, ITM
reranking each query's ITC top k: <code>k</code> in the round's eval.json, 16 by default, 256 in BLIP's
COCO protocol; caption BLEU-4/CIDEr/attribute accuracy), and the cleaning run that made its training
data (filter precision/recall/F1 of dropping noisy web captions against ground truth, kept rate by
caption source).</p>
{table}
{sections}
<p id="status" data-images="0" data-broken="0" data-errors="0">checking images…</p>
<script>
window.addEventListener("error", () => {{ const s = document.getElementById("status");
  s.dataset.errors = String(Number(s.dataset.errors) + 1); }});
window.addEventListener("load", () => {{
  const imgs = [...document.images]; const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0);
  const s = document.getElementById("status"); s.dataset.images = String(imgs.length);
  s.dataset.broken = String(broken.length);
  s.textContent = imgs.length + " images, " + broken.length + " failed to load";
}});
</script>
</body></html>
"""


def _table_html(views: list[RoundView]) -> str:
    cols = list(views[0].row) if views else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["round", *cols])
    body = "".join(
        "<tr>"
        + f"<th>{html.escape(v.name)}</th>"
        + "".join(f"<td>{_fmt(v.row.get(c))}</td>" for c in cols)
        + "</tr>"
        for v in views
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(root: Path, out: Path | None = None, truth: Path | None = None) -> Path:
    """Write ROOT/report.html (or OUT) for a bootstrap folder or a single run folder; return its path."""
    root = Path(root)
    views = _rounds(root)
    truth_rows = _truth(root, truth)
    sections = []
    for v in views:
        if v.run_dir is None:
            continue
        scores = run_scores(v.run_dir, truth_rows)
        if not scores.rows:
            continue
        cards = "".join(_example_card(r, s, truth_rows) for r, s in _example_samples(scores.chosen()))
        sections.append(
            f"<h2>{html.escape(v.name)}: cleaning run</h2>{scores.histograms()}"
            f'<h3>Examples</h3><div class="grid">{cards}</div>'
        )
    page = PAGE.format(title=html.escape(root.name), table=_table_html(views), sections="\n".join(sections))
    out = Path(out) if out else root / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
