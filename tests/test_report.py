"""`attrib report` and `attrib top` on a scores directory written here (no model needed)."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

LAYERS = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"]
QUERIES = [
    {"id": "capital", "prompt": "The capital of Vorlia is", "completion": " Quendar."},
    {"id": "rivers", "prompt": "Rivers run to the", "completion": " sea."},
    {"id": "markup", "prompt": "Is <b>bold</b> & safe?", "completion": " <i>yes</i>"},
]
HOSTILE = (
    "Ignore this: <script>alert(1)</script> and <img src=x onerror=\"console.error('INJECTED')\"> "
    "then <a href=\"javascript:alert(2)\">click</a> & more."
)
WORDS = "influence functions ask which training documents changed the model and by how much".split()
TOKEN_SCORES_TOP = 5  # like `attrib query --token-scores-top 5`: later documents have no token rows


def token_spans(text: str) -> list[tuple[int, int]]:
    """Word tokens with their leading spaces, after an empty BOS token, as character spans."""
    return [(0, 0)] + [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", text)]


def build_scores(directory: Path, documents_per_query: int = 30, seed: int = 0, complete: bool = True) -> Path:
    """A finished `attrib query` directory with several queries, layers, chunked documents and a hostile one."""
    import numpy as np

    from attrib.score_tables import DOCUMENTS, TOKENS_DIR, documents_schema, tokens_schema, write_table
    from attrib.storage import StageDir

    rng = np.random.default_rng(seed)
    stage = StageDir(directory, "query", {"top_k": None, "query_gradients": {"query_rank": 32}},
                     {"spec": "tiny-gpt2", "model_type": "gpt2", "fingerprint": "f" * 64, "tracked_modules": LAYERS})
    docs = {c: [] for c in documents_schema().names}
    tokens = {c: [] for c in tokens_schema().names}
    for q_index, query in enumerate(QUERIES):
        rows = []
        for d in range(documents_per_query):
            doc_id = "evil<doc>&\"'" if (q_index, d) == (0, 0) else f"doc{d}"
            chunk_texts = [HOSTILE] if doc_id.startswith("evil") else [
                " ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(1 + d % 2)
            ]
            chunks = []
            for text in chunk_texts:
                spans = token_spans(text)
                chunks.append((text, spans, rng.standard_t(2, size=len(spans)).astype(np.float32) / 100))
            if doc_id.startswith("evil"):
                chunks[0][2][:] = np.abs(chunks[0][2]) + 0.05  # the strongest document of the first query
            score = float(sum(float(s.astype(np.float64).sum()) for _, _, s in chunks))
            split = rng.dirichlet(np.ones(len(LAYERS)))
            rows.append((score, doc_id, chunks, [float(score * w) for w in split]))
        rows.sort(key=lambda row: -row[0])
        for rank, (score, doc_id, chunks, layer_scores) in enumerate(rows, start=1):
            docs["query_id"].append(query["id"])
            docs["doc_id"].append(doc_id)
            docs["score"].append(score)
            docs["rank"].append(rank)
            docs["prefilter_rank"].append(rank + 3 if q_index == 0 else None)
            docs["layer_scores"].append(layer_scores)
            if rank > TOKEN_SCORES_TOP:
                continue
            for chunk_index, (text, spans, scores) in enumerate(chunks):
                tokens["query_id"].append(query["id"])
                tokens["doc_id"].append(doc_id)
                tokens["chunk"].append(chunk_index)
                tokens["text"].append(text)
                tokens["token_ids"].append(list(range(len(spans))))
                tokens["tokens"].append([text[a:b] for a, b in spans])
                tokens["token_start"].append([a for a, _ in spans])
                tokens["token_end"].append([b for _, b in spans])
                tokens["token_scores"].append([float(s) for s in scores])
    write_table(directory / DOCUMENTS, docs, documents_schema())
    half = len(tokens["query_id"]) // 2
    for part, rows in enumerate([slice(0, half), slice(half, None)]):
        write_table(directory / TOKENS_DIR / f"part-{part:05d}.parquet",
                    {k: v[rows] for k, v in tokens.items()}, tokens_schema())
    if complete:
        stage.complete({"documents": documents_per_query, "queries": len(QUERIES),
                        "rows_skipped": {"empty text": 2, "missing field": 0}},
                       [DOCUMENTS, f"{TOKENS_DIR}/part-00000.parquet", f"{TOKENS_DIR}/part-00001.parquet"],
                       queries=QUERIES, layers=LAYERS, strategy="ekfac",
                       query_gradients_settings={"query_rank": 32, "damping": None, "damping_scale": 0.1})
    return directory


@pytest.fixture(scope="module")
def scores_dir(tmp_path_factory):
    return build_scores(tmp_path_factory.mktemp("scores") / "scores")


@pytest.fixture(scope="module")
def page(scores_dir, tmp_path_factory):
    from attrib.report import write_report

    out = write_report(scores_dir, tmp_path_factory.mktemp("report") / "report.html", top_k=10)
    return out.read_text(encoding="utf-8")


def sections(page: str) -> list[str]:
    return re.findall(r'<section class="query".*?</section>', page, flags=re.S)


def articles(section: str) -> list[str]:
    return re.findall(r'<article class="doc">.*?</article>', section, flags=re.S)


TOKEN_SPAN = re.compile(r'<span class="t (z|[pn]\d+)" title="([^"]*)">(.*?)</span>', flags=re.S)


def stored_chunks(scores_dir: Path, query_id: str, doc_id: str):
    from attrib.score_tables import read_token_rows

    return read_token_rows(scores_dir, [(query_id, doc_id)]).to_pylist()


def test_one_section_per_query_with_prompt_ranks_and_documents(page, scores_dir):
    import pyarrow.parquet as pq

    table = pq.read_table(scores_dir / "documents.parquet").to_pylist()
    found = sections(page)
    assert len(found) == len(QUERIES)
    for section, query in zip(found, QUERIES):
        assert f"Query {html.escape(query['id'])}" in section
        assert html.escape(query["prompt"]) in section and html.escape(query["completion"]) in section
        shown = articles(section)
        assert len(shown) == 10
        headers = re.findall(r"<header>#(\d+) <b>(.*?)</b>", section)
        top = sorted((r for r in table if r["query_id"] == query["id"]), key=lambda r: r["rank"])[:10]
        assert [(int(rank), html.unescape(doc_id)) for rank, doc_id in headers] == [(r["rank"], r["doc_id"]) for r in top]
        assert section.count("(no token scores stored)") == 10 - TOKEN_SCORES_TOP
        assert ("TF-IDF rank" in section) == (query["id"] == "capital")


def test_header_and_query_index_read_from_the_top(page, scores_dir):
    """The header names the strategy and the skipped rows from the manifest; the index shows each query's
    prompt, completion and top document, linked to its section."""
    import pyarrow.parquet as pq

    header = page[: page.index("<nav>")]
    assert "<dt>strategy</dt><dd>ekfac</dd>" in header and "<dt>query rank</dt><dd>32</dd>" in header
    assert "<dt>rows skipped</dt><dd>2 empty text</dd>" in header and "{}" not in header and "?" not in header
    index = page[page.index("<nav>") : page.index("</nav>")]
    table = pq.read_table(scores_dir / "documents.parquet").to_pylist()
    for number, query in enumerate(QUERIES, start=1):
        top = next(r for r in table if r["query_id"] == query["id"] and r["rank"] == 1)
        entry = re.search(rf'<li><a href="#q{number}">{re.escape(html.escape(query["id"]))}</a>(.*?)</li>', index,
                          flags=re.S)
        assert entry, query["id"]
        text = html.unescape(re.sub(r"<[^>]+>", "", entry.group(1)))
        assert query["prompt"] + query["completion"] in text and "top: " + top["doc_id"] in text
        assert f'id="q{number}"' in sections(page)[number - 1]


def test_every_nonempty_token_has_one_span_and_the_text_is_complete(page, scores_dir):
    import pyarrow.parquet as pq

    table = pq.read_table(scores_dir / "documents.parquet").to_pylist()
    for section, query in zip(sections(page), QUERIES):
        top = sorted((r for r in table if r["query_id"] == query["id"]), key=lambda r: r["rank"])[:TOKEN_SCORES_TOP]
        for article, row in zip(articles(section), top):
            chunks = stored_chunks(scores_dir, query["id"], row["doc_id"])
            nonempty = sum(1 for c in chunks for a, b in zip(c["token_start"], c["token_end"]) if b > a)
            assert len(TOKEN_SPAN.findall(article)) == nonempty
            shown = re.findall(r'<div class="chunk">(.*?)</div>', article, flags=re.S)
            assert [html.unescape(re.sub(r"<[^>]+>", "", s)) for s in shown] == [c["text"] for c in chunks]
            assert sum(sum(c["token_scores"]) for c in chunks) == pytest.approx(row["score"], rel=1e-4)


def test_colours_follow_sign_and_size_of_token_scores(page):
    from attrib.report import LEVELS

    for section in sections(page):
        spans = [(cls, float(title)) for cls, title, _ in TOKEN_SPAN.findall(section)]
        assert spans
        for cls, value in spans:
            assert cls[0] == ("p" if value > 0 else "n" if value < 0 else "z")
        by_size = sorted(spans, key=lambda s: abs(s[1]))
        levels = [int(cls[1:]) if cls != "z" else 0 for cls, _ in by_size]
        assert levels == sorted(levels)
        assert levels[-1] == LEVELS  # the strongest token of each query gets the deepest colour
        assert {cls[0] for cls, _ in spans} == {"p", "n"}


def test_hostile_document_text_ids_and_prompts_are_escaped(page):
    assert "<script" not in page and "<img" not in page and "javascript:alert(2)\">" not in page
    assert "> &lt;script&gt;alert(1)&lt;/script&gt;</span>" in page
    assert " onerror=&quot;console.error(&#x27;INJECTED&#x27;)&quot;&gt;</span>" in page
    assert html.escape("evil<doc>&\"'") in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; safe?" in page
    assert "default-src 'none'" in page  # and the page forbids scripts even if escaping ever failed


def test_layer_chart_sums_the_shown_documents_and_rank_plot_is_drawn(page, scores_dir):
    import pyarrow.parquet as pq

    table = pq.read_table(scores_dir / "documents.parquet").to_pylist()
    first = sections(page)[0]
    top = [r for r in table if r["query_id"] == "capital" and r["rank"] <= 10]
    for index, layer in enumerate(LAYERS):
        total = sum(r["layer_scores"][index] for r in top)
        drawn = re.search(rf"<title>{re.escape(layer)}: ([^<]+)</title>", first).group(1)
        assert float(drawn) == pytest.approx(total, rel=1e-3)
    assert '<svg class="ranks"' in first and "over all 30 scored documents" in first


def test_big_run_page_stays_small_and_reads_tokens_of_shown_documents_only(tmp_path, monkeypatch):
    import attrib.score_tables as score_tables
    from attrib.report import RANK_PLOT_POINTS, write_report

    scores_dir = build_scores(tmp_path / "big", documents_per_query=3000)
    asked = []
    real = score_tables.read_token_rows
    monkeypatch.setattr(score_tables, "read_token_rows", lambda d, pairs: asked.append(pairs) or real(d, pairs))
    page = write_report(scores_dir, tmp_path / "report.html", top_k=4).read_text()
    assert [len(pairs) for pairs in asked] == [4 * len(QUERIES)]
    assert len(page) < 120_000
    for points in re.findall(r'<polyline[^>]* points="([^"]*)"', page):
        assert len(points.split()) <= RANK_PLOT_POINTS


def test_merged_and_empty_token_spans():
    from attrib.report import chunk_segments

    text = "Aé b"  # é split over two byte tokens that share its character span
    segments = chunk_segments(text, [0, 0, 1, 1, 2], [0, 1, 2, 2, 4], [5.0, 1.0, 2.0, 3.0, -1.0])
    assert [(s.text, s.score, s.tokens) for s in segments] == [("A", 1.0, 1), ("é", 5.0, 2), (" b", -1.0, 1)]
    gaps = chunk_segments("ab  cd  ", [0, 4], [2, 6], [1.0, 2.0])
    assert [(s.text, s.score) for s in gaps] == [("ab", 1.0), ("  ", None), ("cd", 2.0), ("  ", None)]


def test_report_command_writes_the_file(capsys, scores_dir, tmp_path):
    out = tmp_path / "r.html"
    code, _, err = run_cli(capsys, "report", scores_dir, "--out", out, "--top-k", 3, "--query", "rivers")
    assert code == 0, err
    assert "report written to" in err
    written = out.read_text()
    assert len(sections(written)) == 1 and len(articles(written)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left behind


def test_top_json_lines(capsys, scores_dir):
    code, out, err = run_cli(capsys, "top", scores_dir, "--format", "json", "--top-k", 6)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 6 * len(QUERIES)
    assert set(rows[0]) == {"query_id", "rank", "doc_id", "score", "prefilter_rank", "snippet"}
    first = [r for r in rows if r["query_id"] == "capital"]
    assert [r["rank"] for r in first] == list(range(1, 7))
    assert first[0]["doc_id"] == "evil<doc>&\"'" and "<script>" in first[0]["snippet"]
    assert all(r["snippet"] for r in first[:TOKEN_SCORES_TOP]) and first[5]["snippet"] == ""
    assert all(r["prefilter_rank"] is None for r in rows if r["query_id"] != "capital")


def test_top_csv(capsys, scores_dir):
    code, out, err = run_cli(capsys, "top", scores_dir, "-f", "csv", "-k", 2, "-q", "markup", "-q", "rivers")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["query_id"], r["rank"]) for r in rows] == [("markup", "1"), ("markup", "2"), ("rivers", "1"), ("rivers", "2")]
    assert all(float(r["score"]) for r in rows)


def test_top_table(capsys, scores_dir):
    code, out, err = run_cli(capsys, "top", scores_dir, "--top-k", 3)
    assert code == 0, err
    for query in QUERIES:
        assert f"query {query['id']}" in out
    assert "evil<doc>&\"'" in out and "prefilter rank" in out


@pytest.fixture
def wrong_dirs(tmp_path):
    from attrib.storage import StageDir

    other = tmp_path / "candidates"
    StageDir(other, "prefilter", {}).complete({}, [])
    return {
        "missing": (tmp_path / "nope", "does not exist"),
        "other stage": (other, "holds the output of `attrib prefilter`"),
        "unfinished": (build_scores(tmp_path / "unfinished", 3, complete=False), "unfinished"),
    }


@pytest.mark.parametrize("case", ["missing", "other stage", "unfinished"])
@pytest.mark.parametrize("command", [["top"], ["report", "--out", "REPORT"]])
def test_bad_scores_dir_is_one_error_line(capsys, wrong_dirs, tmp_path, case, command):
    path, fragment = wrong_dirs[case]
    args = [str(tmp_path / "r.html") if a == "REPORT" else a for a in command]
    with pytest.raises(SystemExit) as exit_info:
        from attrib.cli import main

        main([args[0], str(path), *args[1:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "SCORES_DIR" in err and fragment in err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["top", "SCORES", "--format", "xml"], "--format xml"),
        (["top", "SCORES", "--top-k", "0"], "--top-k"),
        (["top", "SCORES", "--query", "nope"], "--query nope"),
        (["report", "SCORES", "--out", "SCORES"], "is a directory"),
    ],
)
def test_bad_options_are_one_error_line(capsys, scores_dir, args, fragment):
    code, _, err = run_cli(capsys, *[str(scores_dir) if a == "SCORES" else a for a in args])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    """The page's console messages: chromium logs them to stderr as `…:CONSOLE…] "message", source: …`."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.browser
def test_report_in_a_real_browser(page, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("ATTRIB_REQUIRE_BROWSER") == "1":  # CI installs chromium and sets this
            pytest.fail("/usr/bin/chromium is missing and ATTRIB_REQUIRE_BROWSER=1: run .ci/browser.sh")
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium, or run .ci/browser.sh, to run this test)")
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><title>c</title><script>console.error('control-message')</script>")
    assert any("control-message" in line for line in console_lines(chromium(tmp_path / "p0", "--dump-dom", control.as_uri()).stderr)), \
        "chromium did not log a console message of the control page; the console check below would be blind"

    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    loaded = chromium(tmp_path / "p1", "--dump-dom", report.as_uri())
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert console_lines(loaded.stderr) == []
    dom = loaded.stdout
    assert "<title>attrib report: tiny-gpt2</title>" in dom  # nothing rewrote the page
    assert HOSTILE in html.unescape(re.sub(r"<[^>]+>", "", dom))  # the hostile document shows as text
    assert "<img" not in dom and "<script" not in dom and "INJECTED" not in loaded.stderr
    assert dom.count('<section class="query"') == len(QUERIES)

    screenshot = tmp_path / "report-screenshot.png"
    shot = chromium(tmp_path / "p2", f"--screenshot={screenshot}", "--window-size=1200,2000", report.as_uri())
    assert shot.returncode == 0 and console_lines(shot.stderr) == []
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    print(f"report screenshot: {screenshot}")
    if os.environ.get("ATTRIB_SAVE_SCREENSHOT") == "1":
        target = Path(__file__).resolve().parents[1] / "docs" / "report-screenshot.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, target)
        print(f"copied to {target}")
