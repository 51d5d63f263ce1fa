"""What `attnserve-client explain` shows: the text report, the PNG heatmap (--png) and the HTML page (--html)."""

from __future__ import annotations

import json
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np

from attnserve_client.explain.explain import Explanation, SentenceAttention

BAR_WIDTH = 30  # characters for 100%
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(weight: float) -> str:
    """A bar of BAR_WIDTH characters at 100%, in eighths of a character."""
    eighths = round(max(0.0, min(1.0, weight)) * BAR_WIDTH * 8)
    return "█" * (eighths // 8) + _EIGHTHS[eighths % 8].strip()


def _percent(weight: float) -> str:
    return f"{100 * weight:5.1f}%"


def _label(answer: SentenceAttention, position: int) -> str:
    return answer.sentence.tokens[position]


def _names(e: Explanation) -> list[str]:
    return ["A", "B"][: len(e.sentences)] if len(e.sentences) > 1 else [""]


def render_text(e: Explanation, top: int | None = None) -> str:
    """The report: what is served, the sentences, one summary line per head, then the listed heads token by token."""
    lines = [f"layer {e.layer} (served: {e.served}), query token {e.token!r}"]
    for name, answer in zip(_names(e), e.sentences, strict=True):
        lines.append(f"{name + '  ' if name else ''}{answer.sentence.text}")
        lines.append(f"{'   ' if name else ''}tokens {answer.sentence.numbered()}")
    lines += ["", *_summary(e), "", *_listings(e, top)]
    if e.attribution:
        lines += ["", *textwrap.wrap(e.attribution, 118, break_on_hyphens=False)]
    return "\n".join(lines)


def _summary(e: Explanation) -> list[str]:
    """One row per head: the token the query looks at most (and its weight on --follow), per sentence."""
    names = _names(e)
    compare = e.target is not None and len(e.sentences) == 2
    header = ["head"]
    for name in names:
        header += [f"{name}: top token" if name else "top token", "weight"] + ([f"on {e.target}"] if e.target else [])
    header += ["change"] if compare else []
    rows = [header]
    for head in range(e.sentences[0].rows.shape[0]):
        row = [str(head)]
        for answer in e.sentences:
            top = answer.top(head)
            row += [_label(answer, top), _percent(float(answer.rows[head, top]))]
            row += [_percent(answer.on_target(head))] if e.target else []
        if compare:
            a, b = (answer.on_target(head) for answer in e.sentences)
            row.append(f"{100 * (b - a):+.1f}")
        rows.append(row)
    title = f"Every head: where {e.token!r} looks most" + (f", and its weight on {e.target!r}" if e.target else "")
    lines = [title, *_aligned(rows)]
    if e.target:
        parts = []
        for name, answer in zip(names, e.sentences, strict=True):
            heads = range(answer.rows.shape[0])
            won = ", ".join(f"{h} ({_percent(answer.on_target(h)).strip()})" for h in heads if answer.target_wins(h))
            parts.append(f"{name + ': ' if name else ''}{won or 'none'}")
        lines.append(f"Heads where {e.target!r} wins: " + "; ".join(parts))
    return lines


def _aligned(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: token columns (text) left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = [all(_is_number(row[i]) for row in rows[1:]) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric, strict=True)
        ).rstrip()
        for row in rows
    ]


def _is_number(cell: str) -> bool:
    try:
        float(cell.strip().rstrip("%"))
    except ValueError:
        return False
    return True


def _listings(e: Explanation, top: int | None) -> list[str]:
    lines: list[str] = []
    for head in e.heads:
        for name, answer in zip(_names(e), e.sentences, strict=True):
            where = f" in {name}" if name else ""
            lines.append(f"Head {head}: {e.token!r} (position {answer.query}){where}")
            order = np.argsort(-answer.rows[head], kind="stable")[:top]
            for position in order:
                weight = float(answer.rows[head, position])
                lines.append(f"  {position:>3}  {_label(answer, int(position)):<14} {_percent(weight)}  {bar(weight)}")
            lines.append("")
    return lines[:-1]


def render_png(e: Explanation, path: Path) -> None:
    """The featured head's attention matrix per sentence, side by side, with token labels; the query row boxed."""
    from matplotlib.figure import Figure  # the Agg canvas: no display, no pyplot state
    from matplotlib.patches import Rectangle

    longest = max(len(a.sentence.tokens) for a in e.sentences)
    side = max(4.5, 0.32 * longest + 1.5)
    figure = Figure(figsize=(side * len(e.sentences) + 1.2, side + 0.8), layout="constrained")
    axes = figure.subplots(1, len(e.sentences), squeeze=False)[0]
    image = None
    for ax, answer in zip(axes, e.sentences, strict=True):
        assert answer.matrix is not None, "render_png needs the full matrices"
        matrix = answer.matrix[e.featured]
        tokens = answer.sentence.tokens
        image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        ax.add_patch(Rectangle((-0.5, answer.query - 0.5), len(tokens), 1, fill=False, edgecolor="crimson", lw=1.5))
        top = answer.top(e.featured)
        title = f"{answer.sentence.text}\n{e.token!r} → {tokens[top]!r} {100 * matrix[answer.query, top]:.0f}%"
        ax.set_title("\n".join(textwrap.wrap(title, 60, replace_whitespace=False)), fontsize=9)
    figure.suptitle(f"attention weights, layer {e.layer} head {e.featured}", fontsize=11)
    assert image is not None, "one panel per sentence, at least one"
    figure.colorbar(image, ax=list(axes), shrink=0.7, label="weight")
    figure.savefig(path, dpi=110)


def page_data(e: Explanation) -> dict[str, object]:
    """What the HTML page draws: per sentence the tokens, the query and every head's matrix (4 decimals)."""
    sentences = []
    for answer in e.sentences:
        assert answer.matrix is not None, "render_html needs the full matrices"
        sentences.append(
            {
                "text": answer.sentence.text,
                "tokens": list(answer.sentence.tokens),
                "query": answer.query,
                "heads": np.round(answer.matrix.astype(np.float64), 4).tolist(),  # float64: short decimals
            }
        )
    return {
        "layer": e.layer,
        "served": e.served,
        "head": e.featured,
        "target": e.target,
        "sentences": sentences,
        "attribution": e.attribution,
    }


def render_html(e: Explanation, path: Path) -> None:
    """A self-contained page (inline CSS and JS, no network): tokens in two columns, lines weighted by attention,
    a head and a sentence selector; hover or click a token on the left to see where it looks."""
    template = resources.files("attnserve_client.explain").joinpath("page.html").read_text(encoding="utf-8")
    data = json.dumps(page_data(e), separators=(",", ":")).replace("</", "<\\/")  # no early </script>
    Path(path).write_text(template.replace("/*DATA*/null", data), encoding="utf-8")
