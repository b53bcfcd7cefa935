"""Influence scores for people: the ranking behind `attrib top` and the HTML page of `attrib report`.

The page follows Grosse et al. (2023): per query, the top documents with each token
coloured by its influence, the split of influence over layers, and the heavy-tailed
distribution of document scores. It is one static file (inline CSS and SVG, no
script at all, and a Content-Security-Policy that forbids scripts) so it can be
mailed around and opened offline. Every string from the run goes through
`html.escape`: training documents are untrusted text.

Only what the page shows is read: the top-k rows of documents.parquet, the token
rows of those documents, and the score column per query for the distribution.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from attrib.errors import InputError
from attrib.score_tables import DOCUMENTS, SELF_INFLUENCE, SELF_QUERY, SUMMARY

LEVELS = 10  # colour steps per sign; more would not be told apart by eye
RANK_PLOT_POINTS = 160  # points per curve in the rank plot, whatever the corpus size
SNIPPET_CHARS = 80


# --------------------------------------------------------------------------- reading


@dataclass
class ScoresRun:
    """A finished `attrib query` (or `attrib self-influence`) output directory and what its manifest says about it."""

    path: Path
    manifest: dict
    queries: list[dict]  # {"id", "prompt", "completion"} in the manifest's order; one pseudo-query "self"
    layers: list[str]

    @property
    def self_influence(self) -> bool:
        return self.manifest.get("stage") == "self-influence"

    def query(self, query_id: str) -> dict:
        return next((q for q in self.queries if q["id"] == query_id), {"id": query_id})


@dataclass
class Segment:
    """A run of a chunk's text: a token (or tokens sharing characters) with its score, or untokenised text."""

    text: str
    score: float | None  # None for text between tokens
    tokens: int = 1


@dataclass
class RankedDocument:
    query_id: str
    doc_id: str
    score: float
    rank: int
    prefilter_rank: int | None
    layer_scores: list[float]
    chunks: list[list[Segment]] = field(default_factory=list)  # empty when no token rows were stored
    chunk: int | None = None  # self-influence ranks sequences: the one chunk of the document shown


@dataclass
class ScoreDistribution:
    """A query's document scores, thinned for a log-log rank plot."""

    count: int
    positive: list[tuple[int, float]]  # (rank, score) of the positive scores, largest first
    negative: list[tuple[int, float]]  # (rank, |score|) of the negative scores, most negative first
    top_percent_share: float | None  # share of the positive influence held by the top 1% of documents


SELF_DESCRIPTION = (
    "Self-influence ⟨H⁻¹∇L_m, ∇L_m⟩ of each training sequence m: high for sequences the model finds surprising "
    "and that move its parameters most (corrupted or mislabelled text, outliers, memorisation candidates)."
)


def open_scores(scores_dir: str | Path) -> ScoresRun:
    """The scores directory's manifest, refused with a one-line reason unless `attrib query` (or
    `attrib self-influence`, shown as the one pseudo-query "self") finished it."""
    from attrib.storage import open_input, read_manifest

    path = Path(scores_dir)
    stage = "self-influence" if path.is_dir() and (read_manifest(path) or {}).get("stage") == "self-influence" else "query"
    manifest = open_input(scores_dir, stage, option="SCORES_DIR")
    table = SELF_INFLUENCE if stage == "self-influence" else DOCUMENTS
    if not (path / table).is_file():
        raise InputError(f"SCORES_DIR {path} has no {table}; rerun `attrib {stage}`")
    queries = [q for q in manifest.get("queries", []) if isinstance(q, dict) and "id" in q]
    if stage == "self-influence":
        queries = [{"id": SELF_QUERY, "description": SELF_DESCRIPTION}]
    return ScoresRun(path, manifest, queries, list(manifest.get("layers", [])))


def select_queries(run: ScoresRun, wanted: list[str] | None) -> list[str]:
    """The query ids to show: all of the manifest's, or the `--query` ones after checking they exist."""
    known = [q["id"] for q in run.queries]
    if not wanted:
        return known
    unknown = [q for q in wanted if q not in known]
    if unknown:
        raise InputError(
            f"--query {unknown[0]} is not in SCORES_DIR {run.path} (queries: {', '.join(known[:10])})"
        )
    return list(dict.fromkeys(wanted))


def ranked_documents(
    run: ScoresRun, top_k: int, query_ids: list[str], with_tokens: bool = True
) -> dict[str, list[RankedDocument]]:
    """The `top_k` documents of each query, best first, with their chunks' token segments."""
    from attrib.score_tables import read_token_rows, read_top_documents, read_top_sequences

    if top_k < 1:
        raise InputError("--top-k must be at least 1")
    if run.self_influence:
        table = read_top_sequences(run.path, top_k).to_pylist() if SELF_QUERY in query_ids else []
    else:
        table = read_top_documents(run.path, top_k, query_ids).to_pylist()
    ranked: dict[str, list[RankedDocument]] = {q: [] for q in query_ids}
    for row in table:
        layer_scores = list(row["layer_scores"] or [])
        if run.layers and len(layer_scores) != len(run.layers):
            raise InputError(
                f"SCORES_DIR {run.path}: document {row['doc_id']!r} has {len(layer_scores)} layer scores "
                f"but the manifest names {len(run.layers)} layers; rerun `attrib query`"
            )
        ranked[row["query_id"]].append(
            RankedDocument(
                row["query_id"], row["doc_id"], row["score"], row["rank"], row["prefilter_rank"], layer_scores,
                chunk=row.get("chunk"),
            )
        )
    if with_tokens:
        shown = {(d.query_id, d.doc_id, d.chunk): d for docs in ranked.values() for d in docs}
        for row in read_token_rows(run.path, list({key[:2] for key in shown})).to_pylist():
            document = shown.get((row["query_id"], row["doc_id"], None)) or shown.get(
                (row["query_id"], row["doc_id"], row["chunk"]))
            if document is not None:
                document.chunks.append(
                    chunk_segments(row["text"], row["token_start"], row["token_end"], row["token_scores"]))
    return ranked


def chunk_segments(text: str, starts: list[int], ends: list[int], scores: list[float]) -> list[Segment]:
    """Split a chunk's text into scored token segments and the plain text between them.

    Tokens with empty spans (a BOS prefix) have no text to colour and are left out.
    Byte-level tokenisers give several tokens the same characters (one accented
    letter split over two byte tokens); those merge into one segment whose score is
    their sum, so every character is shown once and no score is lost.
    """
    segments: list[Segment] = []
    cursor = 0
    for start, end, score in zip(starts, ends, scores):
        if end <= start:
            continue
        if start < cursor:  # shares characters with the token before it
            merged = segments[-1]
            merged.text += text[cursor:end] if end > cursor else ""
            merged.score += float(score)
            merged.tokens += 1
            cursor = max(cursor, end)
            continue
        if start > cursor:
            segments.append(Segment(text[cursor:start], None))
        segments.append(Segment(text[start:end], float(score)))
        cursor = end
    if cursor < len(text):
        segments.append(Segment(text[cursor:], None))
    return segments


def score_distribution(run: ScoresRun, query_id: str, points: int = RANK_PLOT_POINTS) -> ScoreDistribution:
    """One query's document scores, reduced to log-spaced ranks (only the score column is read).

    documents.parquet may keep only the most positive and most negative documents of a query;
    the count and the positive mass of all of them then come from summary.parquet.
    """
    import numpy as np
    import pyarrow.dataset as ds

    if run.self_influence:
        column = ds.dataset(str(run.path / SELF_INFLUENCE), format="parquet").to_table(columns=["score"])["score"]
    else:
        dataset = ds.dataset(str(run.path / DOCUMENTS), format="parquet")
        column = dataset.to_table(columns=["score"], filter=ds.field("query_id") == query_id)["score"]
    scores = np.sort(column.to_numpy(zero_copy_only=False).astype(np.float64))[::-1]
    positive = scores[scores > 0]
    negative = -scores[scores < 0][::-1]
    count, positive_mass = scores.size, positive.sum()
    if (run.path / SUMMARY).is_file():
        summary = ds.dataset(str(run.path / SUMMARY)).to_table(filter=ds.field("query_id") == query_id).to_pylist()
        if summary:
            count, positive_mass = summary[0]["documents"], summary[0]["positive_sum"]
    share = None
    if positive.size and positive_mass > 0:
        top = max(1, math.ceil(0.01 * count))
        share = float(positive[:top].sum() / positive_mass)
    return ScoreDistribution(int(count), _log_thinned(positive, points), _log_thinned(negative, points), share)


def _log_thinned(values, points: int) -> list[tuple[int, float]]:
    """(rank, value) at about `points` log-spaced ranks: exact on a log axis, small for any length."""
    import numpy as np

    if values.size == 0:
        return []
    ranks = np.unique(np.geomspace(1, values.size, num=min(points, values.size)).round().astype(int))
    return [(int(r), float(values[r - 1])) for r in ranks]


def snippet(document: RankedDocument, width: int = SNIPPET_CHARS) -> str:
    """A line of text around the document's most influential token, for terminal tables."""
    best = None
    for chunk in document.chunks:
        text = "".join(s.text for s in chunk)
        offset = 0
        for segment in chunk:
            if segment.score is not None and (best is None or abs(segment.score) > abs(best[0])):
                best = (segment.score, text, offset, offset + len(segment.text))
            offset += len(segment.text)
    if best is None:
        return ""
    _, text, start, end = best
    margin = max(0, (width - (end - start)) // 2)
    left, right = max(0, start - margin), min(len(text), end + margin)
    line = " ".join(text[left:right].split())
    return ("…" if left > 0 else "") + line + ("…" if right < len(text) else "")


def top_rows(run: ScoresRun, top_k: int, query_ids: list[str], with_snippets: bool = True) -> list[dict]:
    """The ranking as plain rows for `attrib top` (table, JSON lines or CSV)."""
    ranked = ranked_documents(run, top_k, query_ids, with_tokens=with_snippets)
    return [
        {
            "query_id": d.query_id,
            "rank": d.rank,
            "doc_id": d.doc_id,
            **({} if d.chunk is None else {"chunk": d.chunk}),
            "score": d.score,
            "prefilter_rank": d.prefilter_rank,
            "snippet": snippet(d) if with_snippets else "",
        }
        for q in query_ids
        for d in ranked[q]
    ]


# --------------------------------------------------------------------------- the page


def write_report(scores_dir: str | Path, out: str | Path, top_k: int = 10, query_ids: list[str] | None = None) -> Path:
    """Build the report of a scores directory and write it atomically to `out`."""
    from attrib.storage import atomic_path

    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    page = build_report(open_scores(scores_dir), top_k, query_ids)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def build_report(run: ScoresRun, top_k: int = 10, query_ids: list[str] | None = None) -> str:
    """The whole page as one string."""
    selected = select_queries(run, query_ids)
    ranked = ranked_documents(run, top_k, selected)
    sections = [
        _query_section(index, run.query(q), ranked[q], run.layers, score_distribution(run, q))
        for index, q in enumerate(selected, start=1)
    ]
    body = _header(run, top_k) + ("" if run.self_influence else _contents(selected, run, ranked)) + "".join(sections)
    return _page(f"attrib report: {run.manifest.get('model', {}).get('spec', run.path.name)}", body)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    return f"{value:+.3g}" if value else "0"


CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #1b1b1b; margin: 0 auto; max-width: 1100px; padding: 1rem 2rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
h2 { border-top: 2px solid #ccc; padding-top: 1rem; margin-top: 2.5rem; }
dl.settings { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; font-size: .9rem; }
dl.settings dt { color: #555; }
dl.settings dd { margin: 0; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.prompt { background: #f4f4f4; padding: .5rem .8rem; border-radius: 4px; white-space: pre-wrap; overflow-wrap: anywhere; }
.completion { font-weight: 600; text-decoration: underline #888; }
ol.index li { margin: .3rem 0; }
ol.index .said { white-space: pre-wrap; overflow-wrap: anywhere; }
ol.index .top { font-size: .85rem; color: #555; overflow-wrap: anywhere; }
ol.index .top b { font-family: ui-monospace, monospace; }
.charts { display: flex; flex-wrap: wrap; gap: 2rem; align-items: flex-start; }
.charts figure { margin: 0; }
.charts figcaption { font-size: .85rem; color: #555; max-width: 480px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
.doc { border: 1px solid #ddd; border-radius: 4px; margin: 1rem 0; }
.doc header { background: #fafafa; border-bottom: 1px solid #ddd; padding: .3rem .8rem; font-size: .9rem; }
.doc header b { font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.doc .text { padding: .5rem .8rem; white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: .85rem; line-height: 1.7; }
.chunk + .chunk { border-top: 1px dashed #bbb; margin-top: .4rem; padding-top: .4rem; }
.none { color: #777; font-style: italic; padding: .3rem .8rem; margin: 0; }
.legend { display: flex; align-items: center; gap: .5rem; font-size: .8rem; color: #444; margin: .5rem 0; }
.legend .scale { display: flex; }
.legend .scale span { width: 14px; height: 14px; }
"""


def _level_css() -> str:
    """One class per colour step: red for positive influence, blue for negative (ColorBrewer RdBu ends)."""
    rules = [".z { }"]
    for level in range(1, LEVELS + 1):
        alpha = round(level / LEVELS * 0.85, 3)
        rules.append(f".p{level} {{ background: rgba(202, 0, 32, {alpha}); }}")
        rules.append(f".n{level} {{ background: rgba(5, 113, 176, {alpha}); }}")
    rules.append(f".p{LEVELS}, .n{LEVELS}, .p{LEVELS - 1}, .n{LEVELS - 1} {{ color: #fff; }}")
    return "\n".join(rules)


def _page(title: str, body: str) -> str:
    policy = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{CSS}{_level_css()}\n</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _header(run: ScoresRun, top_k: int) -> str:
    model = run.manifest.get("model", {})
    settings = run.manifest.get("settings", {})
    gradients = run.manifest.get("query_gradients_settings") or settings.get("query_gradients") or {}
    counts = run.manifest.get("counts", {})
    rows = {
        "model": model.get("spec", "?"),
        "model type": model.get("model_type", "?"),
        "fingerprint": str(model.get("fingerprint", "?"))[:16],
        "strategy": run.manifest.get("strategy") or settings.get("strategy", "?"),
        "query rank": gradients.get("query_rank", settings.get("query_rank", "?")),
        "damping": _damping(gradients or settings),
        "tracked layers": len(run.layers),
        **{k.replace("_", " "): f"{v:,}" if isinstance(v, int) else v
           for k, v in counts.items() if not isinstance(v, dict)},
        "rows skipped": _skipped(counts.get("rows_skipped")),
        "shown": f"top {top_k} documents per query",
    }
    if run.self_influence:
        del rows["query rank"]
        rows["shown"] = f"top {top_k} training sequences"
    items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in rows.items() if v is not None)
    others = {k: v for k, v in settings.items() if k not in ("strategy", "query_rank")}
    more = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in sorted(others.items()))
    details = f"<details><summary>all settings</summary><dl class=\"settings\">{more}</dl></details>" if more else ""
    if run.self_influence:
        return (
            f"<h1>Self-influence report</h1>\n<p>Scores from <code>{_esc(run.path)}</code>. {_esc(SELF_DESCRIPTION)}</p>\n"
            f"<dl class=\"settings\">{items}</dl>\n{details}\n"
        )
    return (
        f"<h1>Influence report</h1>\n<p>Scores from <code>{_esc(run.path)}</code>. Positive influence: training on "
        "the document makes the completion <em>more</em> likely.</p>\n"
        f"<dl class=\"settings\">{items}</dl>\n{details}\n"
    )


def _damping(gradients: dict) -> str | None:
    """'0.001 × mean eigenvalue per layer' or the absolute value; None when the manifest does not say."""
    if gradients.get("damping") is not None:
        return f"{gradients['damping']:g} (every layer)"
    if gradients.get("damping_scale") is not None:
        return f"{gradients['damping_scale']:g} × mean eigenvalue, per layer"
    return None


def _skipped(skipped) -> str | None:
    """'3 empty text, 1 missing field', or None (not shown) when no row was skipped."""
    if not isinstance(skipped, dict) or not any(skipped.values()):
        return None
    return ", ".join(f"{count:,} {reason}" for reason, count in sorted(skipped.items()) if count)


def _contents(selected: list[str], run: ScoresRun, ranked: dict[str, list[RankedDocument]]) -> str:
    """Every query with its prompt, completion and top document, so the page reads from the top."""
    entries = []
    for index, query_id in enumerate(selected, start=1):
        query = run.query(query_id)
        text = (
            f"<span class=\"said\">{_esc(query['prompt'])}<span class=\"completion\">{_esc(query['completion'])}"
            "</span></span>" if query.get("prompt") is not None else ""
        )
        documents = ranked.get(query_id) or []
        if documents:
            best = documents[0]
            line = snippet(best)
            top = (f"<span class=\"top\">top: <b>{_esc(best.doc_id)}</b> {_esc(_fmt(best.score))}"
                   f"{' · ' + _esc(line) if line else ''}</span>")
        else:
            top = "<span class=\"top\">no documents scored</span>"
        entries.append(f"<li><a href=\"#q{index}\">{_esc(query_id)}</a> {text}<br>{top}</li>")
    return f"<nav><h3>Queries</h3><ol class=\"index\">{''.join(entries)}</ol></nav>\n"


def _query_section(
    index: int, query: dict, documents: list[RankedDocument], layers: list[str], distribution: ScoreDistribution
) -> str:
    scale = max(
        (abs(s.score) for d in documents for chunk in d.chunks for s in chunk if s.score is not None), default=0.0
    )
    prompt = query.get("prompt")
    shown = (
        f"<div class=\"prompt\">{_esc(prompt)}<span class=\"completion\">{_esc(query.get('completion', ''))}</span></div>"
        if prompt is not None
        else "<p class=\"none\">(the manifest does not record this query's text)</p>"
    )
    heading = f"Query {_esc(query['id'])}"
    explained = "<p>Prompt, then the <span class=\"completion\">completion</span> whose log-probability is explained:</p>\n"
    if "description" in query:  # the pseudo-query of a self-influence run
        heading, explained, shown = "Training sequences by self-influence", "", f"<p>{_esc(query['description'])}</p>"
    docs = "".join(_document(d, scale) for d in documents) or "<p class=\"none\">(no documents scored)</p>"
    return (
        f"<section class=\"query\" id=\"q{index}\">\n<h2>{heading}</h2>\n"
        f"{explained}{shown}\n<div class=\"charts\">{_layer_chart(layers, documents)}{_rank_plot(distribution)}</div>\n"
        f"<h3>Top {len(documents)} {'sequences' if 'description' in query else 'documents'}</h3>\n{_legend(scale)}\n{docs}</section>\n"
    )


def _document(document: RankedDocument, scale: float) -> str:
    prefilter = (
        f" · TF-IDF rank {document.prefilter_rank}" if document.prefilter_rank is not None else ""
    )
    what = "influence" if document.chunk is None else f"chunk {document.chunk} · self-influence"
    head = (
        f"<header>#{document.rank} <b>{_esc(document.doc_id)}</b> · {what} "
        f"<span title=\"{document.score!r}\">{_esc(_fmt(document.score))}</span>{prefilter}</header>"
    )
    if not document.chunks:
        return f"<article class=\"doc\">{head}<p class=\"none\">(no token scores stored)</p></article>\n"
    chunks = "".join(f"<div class=\"chunk\">{_tokens(chunk, scale)}</div>" for chunk in document.chunks)
    return f"<article class=\"doc\">{head}<div class=\"text\">{chunks}</div></article>\n"


def colour_class(score: float, scale: float) -> str:
    """The colour step of a token: sign picks red or blue, the square root of |score|/scale the depth.

    The square root keeps tokens a tenth as strong as the strongest still visible.
    """
    if scale <= 0 or score == 0:
        return "z"
    level = min(LEVELS, max(1, math.ceil(LEVELS * math.sqrt(abs(score) / scale))))
    return f"{'p' if score > 0 else 'n'}{level}"


def _tokens(segments: list[Segment], scale: float) -> str:
    parts = []
    for segment in segments:
        if segment.score is None:
            parts.append(_esc(segment.text))
            continue
        count = f" ({segment.tokens} tokens)" if segment.tokens > 1 else ""
        parts.append(
            f"<span class=\"t {colour_class(segment.score, scale)}\" title=\"{segment.score:+.4g}{count}\">"
            f"{_esc(segment.text)}</span>"
        )
    return "".join(parts)


def _legend(scale: float) -> str:
    if scale <= 0:
        return ""
    steps = [f"n{level}" for level in range(LEVELS, 0, -1)] + ["z"] + [f"p{level}" for level in range(1, LEVELS + 1)]
    swatches = "".join(f"<span class=\"{s}\"></span>" for s in steps)
    return (
        f"<div class=\"legend\">token influence: <span>{_esc(_fmt(-scale))}</span>"
        f"<span class=\"scale\">{swatches}</span><span>{_esc(_fmt(scale))}</span>"
        "(square-root scale; hover a token for its value)</div>"
    )


def _layer_chart(layers: list[str], documents: list[RankedDocument]) -> str:
    """Horizontal bars of the influence each layer contributes, summed over the shown documents."""
    if not layers or not documents:
        return ""
    totals = [sum(d.layer_scores[i] for d in documents) for i in range(len(layers))]
    extent = max(abs(t) for t in totals) or 1.0
    row, label_width, bar_width = 16, 230, 260
    zero = label_width + bar_width / 2
    height = row * len(layers) + 24
    bars = []
    for i, (name, total) in enumerate(zip(layers, totals)):
        y = 4 + i * row
        length = abs(total) / extent * (bar_width / 2)
        x = zero if total >= 0 else zero - length
        colour = "#ca0020" if total >= 0 else "#0571b0"
        label = name if len(name) <= 34 else "…" + name[-33:]
        bars.append(
            f"<text x=\"{label_width - 6}\" y=\"{y + 11}\" text-anchor=\"end\">{_esc(label)}</text>"
            f"<rect x=\"{x:.1f}\" y=\"{y + 2}\" width=\"{max(length, 0.5):.1f}\" height=\"{row - 4}\" fill=\"{colour}\">"
            f"<title>{_esc(name)}: {total:+.4g}</title></rect>"
        )
    axis = (
        f"<line x1=\"{zero}\" y1=\"0\" x2=\"{zero}\" y2=\"{height - 18}\" stroke=\"#666\"/>"
        f"<text x=\"{label_width}\" y=\"{height - 4}\">{_esc(_fmt(-extent))}</text>"
        f"<text x=\"{zero}\" y=\"{height - 4}\" text-anchor=\"middle\">0</text>"
        f"<text x=\"{label_width + bar_width}\" y=\"{height - 4}\" text-anchor=\"end\">{_esc(_fmt(extent))}</text>"
    )
    svg = (
        f"<svg class=\"layers\" width=\"{label_width + bar_width + 10}\" height=\"{height}\" "
        f"role=\"img\" aria-label=\"influence per layer\">{''.join(bars)}{axis}</svg>"
    )
    caption = f"Influence per layer, summed over the top {len(documents)} documents."
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def _rank_plot(distribution: ScoreDistribution) -> str:
    """|score| against rank on log-log axes, one curve per sign: a straight-ish line means a heavy tail."""
    curves = [(distribution.positive, "#ca0020", "positive"), (distribution.negative, "#0571b0", "negative")]
    values = [v for curve, _, _ in curves for _, v in curve]
    if not values:
        return ""
    width, height, left, bottom = 420, 260, 50, 30
    x_max = math.log10(max(distribution.count, 10))
    y_lo, y_hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    y_hi = max(y_hi, y_lo + 1)

    def point(rank: int, value: float) -> str:
        x = left + math.log10(rank) / x_max * (width - left - 10)
        y = (height - bottom) - (math.log10(value) - y_lo) / (y_hi - y_lo) * (height - bottom - 10)
        return f"{x:.1f},{y:.1f}"

    ticks = []
    for decade in range(0, math.floor(x_max) + 1):
        x = left + decade / x_max * (width - left - 10)
        ticks.append(f"<text x=\"{x:.1f}\" y=\"{height - bottom + 14}\" text-anchor=\"middle\">1e{decade}</text>")
    step = max(1, (y_hi - y_lo) // 5)
    for decade in range(y_lo, y_hi + 1, step):
        y = (height - bottom) - (decade - y_lo) / (y_hi - y_lo) * (height - bottom - 10)
        ticks.append(f"<text x=\"{left - 4}\" y=\"{y + 4:.1f}\" text-anchor=\"end\">1e{decade}</text>")
        ticks.append(f"<line x1=\"{left}\" y1=\"{y:.1f}\" x2=\"{width - 10}\" y2=\"{y:.1f}\" stroke=\"#eee\"/>")
    lines = "".join(
        f"<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.8\" points=\"{' '.join(point(r, v) for r, v in curve)}\">"
        f"<title>{name} scores ({len(curve)} plotted)</title></polyline>"
        for curve, colour, name in curves
        if curve
    )
    frame = (
        f"<line x1=\"{left}\" y1=\"{height - bottom}\" x2=\"{width - 10}\" y2=\"{height - bottom}\" stroke=\"#666\"/>"
        f"<line x1=\"{left}\" y1=\"0\" x2=\"{left}\" y2=\"{height - bottom}\" stroke=\"#666\"/>"
        f"<text x=\"{(width + left) / 2}\" y=\"{height - 2}\" text-anchor=\"middle\">rank (from the strongest)</text>"
        f"<text x=\"{left + 6}\" y=\"10\">|score|</text>"
    )
    svg = (
        f"<svg class=\"ranks\" width=\"{width}\" height=\"{height}\" role=\"img\" "
        f"aria-label=\"document scores by rank\">{''.join(ticks)}{frame}{lines}</svg>"
    )
    positives = distribution.positive[-1][0] if distribution.positive else 0
    negatives = distribution.negative[-1][0] if distribution.negative else 0
    share = (
        f" The top 1% of documents hold {distribution.top_percent_share:.0%} of the positive influence."
        if distribution.top_percent_share is not None
        else ""
    )
    caption = (
        f"|score| by rank, log-log, over all {distribution.count:,} scored documents: "
        f"<span style=\"color:#ca0020\">{positives:,} positive</span>, "
        f"<span style=\"color:#0571b0\">{negatives:,} negative</span>.{share}"
    )
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"
