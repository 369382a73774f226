"""A document as a list of blocks (headings, stats, tables, figures, notes), and its two renderings:
one self-contained HTML file (images embedded) and markdown (images linked). Used by reports and comparisons."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from rlhflab.evaluation.health import HealthNote
from rlhflab.evaluation.plots import FigureRef


def fmt(value: object, digits: int = 3) -> str:
    """A table cell: numbers to `digits` significant figures, missing as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)



@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Stats:
    """Label/value tiles (a two-column table in markdown)."""

    items: list[tuple[str, str]]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figures:
    figures: list[FigureRef]


@dataclass
class Notes:
    notes: list[HealthNote]


@dataclass
class Details:
    """Collapsed preformatted text (the config)."""

    summary: str
    text: str


Block = Heading | Text | Stats | Table | Figures | Notes | Details


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)



# ------------------------------------------------------------------------------------------ rendering

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       background: #f5f6f8; color: #1f2328; font-size: 15px; line-height: 1.45; }
main { max-width: 1400px; margin: 0 auto; padding: 20px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 16px; }
h2 { font-size: 20px; border-bottom: 2px solid #d8dee4; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 17px; margin-top: 24px; } h4 { font-size: 15px; margin: 18px 0 6px; color: #4C72B0; }
code { background: #eaeef2; padding: 1px 5px; border-radius: 4px; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.stat { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 8px 12px; }
.stat .label { font-size: 12px; color: #57606a; } .stat .value { font-size: 18px; font-weight: 600;
       overflow-wrap: anywhere; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(470px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 6px; }
figure img { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 14px; margin: 8px 0; }
th, td { border: 1px solid #d8dee4; padding: 6px 9px; text-align: left; vertical-align: top;
         white-space: pre-wrap; }
td.num { width: 1%; white-space: nowrap; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef1f4; } tr:nth-child(even) td { background: #fafbfc; }
.note { background: #fff; border: 1px solid #d8dee4; border-left: 5px solid #C44E52; border-radius: 6px;
        padding: 8px 14px; margin: 8px 0; }
.note.ok { border-left-color: #55A868; }
.note .what { font-weight: 600; } .note .why { color: #57606a; }
details { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 14px; }
summary { cursor: pointer; font-weight: 600; }
pre { font-size: 13px; overflow-x: auto; }
"""


def _inline(text: str) -> str:
    """Escape text for HTML, then turn `code` spans into <code> (the only markup a Text block may hold)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def _html_cell(value: object) -> str:
    """A table cell; numbers get the "num" class so their columns stay narrow and the text columns get the room."""
    text = str(value)
    try:
        float(text)
    except ValueError:
        return f"<td>{html.escape(text)}</td>"
    return f'<td class="num">{text}</td>'


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{esc(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Stats):
        tiles = "".join(
            f'<div class="stat"><div class="label">{esc(k)}</div><div class="value">{esc(v)}</div></div>'
            for k, v in block.items
        )
        return f'<div class="stats">{tiles}</div>'
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Figures):
        images = "".join(
            f'<figure><img src="data:image/png;base64,{base64.b64encode(f.path.read_bytes()).decode()}" '
            f'alt="{esc(f.title)}"></figure>'
            for f in block.figures
        )
        return f'<div class="figures">{images}</div>'
    if isinstance(block, Notes):
        if not block.notes:
            return '<div class="note ok">No alarms: every health check stayed quiet.</div>'
        return "".join(
            f'<div class="note"><div class="what">{esc(n.code)}: {esc(n.message)}</div>'
            f'<div class="why"><b>Likely cause:</b> {esc(n.cause)}</div><div><b>Fix:</b> {esc(n.fix)}</div></div>'
            for n in block.notes
        )
    return f"<details><summary>{esc(block.summary)}</summary><pre>{esc(block.text)}</pre></details>"


def render_html(doc: Document) -> str:
    """One self-contained HTML page: inline CSS, images as base64 data URIs."""
    body = "\n".join(_html_block(block) for block in doc.blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(doc.title)}</title>'
        f"<style>{CSS}</style></head>\n<body><main>\n<h1>{html.escape(doc.title)}</h1>\n{body}\n</main></body></html>\n"
    )


def _md_cell(value: object) -> str:
    """A markdown table cell: HTML-escaped (answers are model text), pipes escaped, newlines as <br>."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", "<br>")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _md_block(block: Block, base: Path) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Stats):
        return _md_table(["", "value"], [list(item) for item in block.items])
    if isinstance(block, Table):
        return _md_table(block.header, block.rows)
    if isinstance(block, Figures):
        return "\n\n".join(f"![{f.title}]({f.path.relative_to(base).as_posix()})" for f in block.figures)
    if isinstance(block, Notes):
        if not block.notes:
            return "No alarms: every health check stayed quiet."
        return "\n".join(
            f"- **{n.code}**: {n.message}\n  - likely cause: {n.cause}\n  - fix: {n.fix}"
            for n in block.notes
        )
    return f"<details><summary>{block.summary}</summary>\n\n```yaml\n{block.text.rstrip()}\n```\n\n</details>"


def render_markdown(doc: Document, base: Path) -> str:
    """Markdown with images linked relative to `base` (the run directory)."""
    return "\n\n".join([f"# {doc.title}", *(_md_block(block, base) for block in doc.blocks)]) + "\n"


