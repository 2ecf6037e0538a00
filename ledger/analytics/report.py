"""Render the named queries: plain-text tables and one self-contained HTML file (inline SVG)."""
from __future__ import annotations

import datetime as dt
import html
import time

from ledger.analytics.queries import QUERIES, run

rows_shown_max = 40
_CHARTS = {  # query → (x column, y column, series column or None)
    "gpu_utilization_by_model_hour": ("hour", "gpu_hours", "gpu_model"),
    "tenant_gpu_hours_cost_by_day": ("day", "gpu_hours", "tenant_id"),
    "top_consumers": ("tenant_id", "gpu_hours", None),
    "stranded_capacity": ("hour", "stranded_gpus", "gpu_model"),
    "failure_and_preemption_rates": ("day", "failure_pct", None),
}


def format_table(cols: list[str], rows: list[tuple], limit: int = rows_shown_max) -> str:
    shown = [[_fmt(v) for v in r] for r in rows[:limit]]
    widths = [max([len(c)] + [len(r[i]) for r in shown]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) for r in shown]
    if len(rows) > limit:
        lines.append(f"… {len(rows) - limit} more rows")
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M")
    if isinstance(v, float):
        return f"{v:,.4f}".rstrip("0").rstrip(".")
    return str(v)


def _numeric(s: str) -> bool:
    return s.replace(",", "").replace(".", "").replace("-", "").isdigit()


def run_all(con) -> list[tuple[str, str, list[str], list[tuple], float]]:
    out = []
    for name, (title, _) in QUERIES.items():
        t0 = time.perf_counter()
        cols, rows = run(con, name)
        out.append((name, title, cols, rows, time.perf_counter() - t0))
    return out


def text_report(results) -> str:
    parts = []
    for name, title, cols, rows, secs in results:
        parts.append(f"== {title} [{name}] ({len(rows)} rows, {secs * 1000:.0f} ms)\n{format_table(cols, rows)}")
    return "\n\n".join(parts)


def _svg_chart(cols, rows, x, y, series) -> str:
    if not rows or x not in cols or y not in cols:
        return ""
    xi, yi = cols.index(x), cols.index(y)
    si = cols.index(series) if series else None
    data: dict[str, list[tuple]] = {}
    for r in rows:
        data.setdefault(str(r[si]) if si is not None else y, []).append((r[xi], float(r[yi] or 0)))
    xs = sorted({r[xi] for r in rows}, key=lambda v: (str(type(v)), v))
    w, h, pad = 720, 260, 40
    ymax = max((v for pts in data.values() for _, v in pts), default=1) or 1
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    parts = [f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" style="font:11px sans-serif">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
             f'<text x="2" y="14">{ymax:.3g}</text><text x="2" y="{h - pad}">0</text>']
    pos = {v: pad + (i + 0.5) * (w - pad - 10) / len(xs) for i, v in enumerate(xs)}
    bar = len(xs) <= 12 and len(data) == 1
    for k, (name, pts) in enumerate(sorted(data.items())):
        color = colors[k % len(colors)]
        coords = [(pos[xv], h - pad - (h - pad - 10) * yv / ymax) for xv, yv in pts]
        if bar:
            bw = max(2, (w - pad - 10) / len(xs) * 0.6)
            for cx, cy in coords:
                parts.append(f'<rect x="{cx - bw / 2:.1f}" y="{cy:.1f}" width="{bw:.1f}" height="{h - pad - cy:.1f}"'
                             f' fill="{color}"/>')
        else:
            pts_s = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
            parts.append(f'<polyline points="{pts_s}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{w - 150}" y="{20 + 14 * k}" fill="{color}">{html.escape(name)}</text>')
    for v in (xs[0], xs[-1]) if xs else ():
        parts.append(f'<text x="{pos[v] - 30:.0f}" y="{h - pad + 16}">{html.escape(_fmt(v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(results, generated_at: dt.datetime | None = None) -> str:
    when = (generated_at or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = [f"<h1>gpuaas capacity report</h1><p>Generated {when} from the DuckDB copy of the ledger.</p>"]
    for name, title, cols, rows, secs in results:
        body.append(f"<h2>{html.escape(title)}</h2><p class=m>{name}: {len(rows)} rows, {secs * 1000:.0f} ms</p>")
        if name in _CHARTS:
            body.append(_svg_chart(cols, rows, *_CHARTS[name]))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                      for r in rows[:200])
        body.append(f"<table><tr>{head}</tr>{trs}</table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}.m{color:#666}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>gpuaas capacity report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
