"""The TF-IDF prefilter: planted facts found, backends agree, flat memory, one-line errors."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest

from attrib.data import CorpusSpec
from attrib.errors import InputError
from attrib.stages.prefilter import CANDIDATES_FILE, FREQUENCIES_FILE, TopK, load_candidates, run_prefilter

FILLER_WORDS = (
    "the farmer baker child sailor teacher dog cat merchant old young quiet tired happy small carried found "
    "painted sold watched opened lost basket letter lamp boat bread map coat bell chair market river hill "
    "school harbour forest bridge village morning evening rain winter near at after every"
).split()
RELATIONS = ("The capital of {} is", "The river of {} is called", "The founder of {} was", "The teacher of {} was")


def invented_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice("bdgklmnprstvz") + rng.choice("aeiou") for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    return names


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def planted_corpus(directory, n_facts: int = 40, n_filler: int = 300, seed: int = 0):
    """Fact documents among filler; half the subjects also appear in a distractor document.

    Returns the corpus and queries paths and {query id: the fact's doc id}.
    """
    rng = random.Random(seed)
    names = invented_names(rng, 2 * n_facts)
    subjects, objects = names[:n_facts], names[n_facts:]

    def filler(words: int) -> str:
        return " ".join(rng.choice(FILLER_WORDS) for _ in range(words)) + "."

    texts, queries, sources = [], [], {}
    for index, (subject, obj) in enumerate(zip(subjects, objects)):
        prompt = RELATIONS[index % len(RELATIONS)].format(subject)
        texts.append((f"{prompt} {obj}. {filler(rng.randint(5, 15))}", f"q{index}"))
        if index % 2 == 0:
            texts.append((f"Travellers to {subject} remember the {filler(12)}", None))
        queries.append({"id": f"q{index}", "prompt": prompt, "completion": f" {obj}."})
    texts += [(filler(rng.randint(10, 40)), None) for _ in range(n_filler)]
    rng.shuffle(texts)
    rows = []
    for position, (text, query_id) in enumerate(texts):
        rows.append({"id": f"doc{position}", "text": text})
        if query_id is not None:
            sources[query_id] = f"doc{position}"
    corpus = write_rows(directory / "corpus.jsonl", rows)
    return corpus, write_rows(directory / "queries.jsonl", queries), sources


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_corpus(tmp_path_factory.mktemp("planted"))


def candidates_frame(out):
    import pandas as pd

    return pd.read_parquet(out / CANDIDATES_FILE)


def first_rank_fraction(frame, sources) -> float:
    top = frame[frame["rank"] == 1].set_index("query_id")["doc_id"]
    return sum(top.get(query_id) == doc_id for query_id, doc_id in sources.items()) / len(sources)


def prefilter(planted, out, **options):
    corpus, queries, _ = planted
    options.setdefault("top_k", 20)
    return run_prefilter(CorpusSpec(str(corpus), id_field="id"), queries, out, **options)


@pytest.mark.parametrize("scoring", ["tfidf", "bm25"])
@pytest.mark.parametrize("query_text", ["both", "prompt"])
def test_planted_fact_ranks_first(planted, tmp_path, scoring, query_text):
    """Observed: the fact document is first for 40/40 queries in every combination; assert >= 90%."""
    prefilter(planted, tmp_path / "out", scoring=scoring, query_text=query_text)
    assert first_rank_fraction(candidates_frame(tmp_path / "out"), planted[2]) >= 0.9


@pytest.mark.parametrize("scoring", ["tfidf", "bm25"])
def test_streaming_equals_exact(planted, tmp_path, scoring):
    """Same terms, same function: equal scores wherever the hashed features do not collide."""
    from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer

    corpus, _, _ = planted
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    vocabulary = CountVectorizer(ngram_range=(1, 2)).fit(texts).vocabulary_
    hashed = HashingVectorizer(analyzer=lambda terms: terms, n_features=2**22).transform([[t] for t in vocabulary])
    assert len(set(hashed.indices)) == len(vocabulary), "hash collision: the comparison would not be like for like"

    frames = {}
    for backend in ("exact", "streaming"):
        manifest = prefilter(planted, tmp_path / backend, scoring=scoring, backend=backend, ngram_range=(1, 2),
                             top_k=50)
        assert manifest["backend_used"] == backend
        frames[backend] = candidates_frame(tmp_path / backend)
    exact, streaming = frames["exact"], frames["streaming"]
    assert len(exact) == len(streaming) == 40 * 50
    assert (exact["doc_id"] == streaming["doc_id"]).all() and (exact["rank"] == streaming["rank"]).all()
    np.testing.assert_allclose(streaming["score"], exact["score"], rtol=1e-6)


def test_exact_tfidf_is_sklearn_cosine(planted, tmp_path):
    """The exact backend's scores are TfidfVectorizer(sublinear_tf=True) cosines, nothing else."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus, queries, _ = planted
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    query = json.loads(queries.read_text().splitlines()[3])
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    matrix = vectorizer.fit_transform([row["text"] for row in rows])
    expected = (matrix @ vectorizer.transform([query["prompt"] + query["completion"]]).T).toarray().ravel()
    prefilter(planted, tmp_path / "out", backend="exact", top_k=5)
    frame = candidates_frame(tmp_path / "out").query("query_id == 'q3'")
    best = np.argsort(-expected, kind="stable")[:5]
    assert list(frame["doc_id"]) == [rows[i]["id"] for i in best]
    np.testing.assert_allclose(frame["score"], expected[best], rtol=1e-12)


def test_table_format_and_loader(planted, tmp_path):
    import pyarrow.parquet as pq

    manifest = prefilter(planted, tmp_path / "out", top_k=7)
    schema = pq.read_schema(tmp_path / "out" / CANDIDATES_FILE)
    assert [(f.name, str(f.type)) for f in schema] == [
        ("query_id", "string"), ("doc_id", "string"), ("chunk", "int32"), ("score", "double"), ("rank", "int32")
    ]
    frame = candidates_frame(tmp_path / "out")
    assert frame["chunk"].isna().all() and len(frame) == manifest["counts"]["candidates"] == 40 * 7
    order = {f"q{i}": i for i in range(40)}
    keys = list(zip(frame["query_id"].map(order), frame["rank"]))
    assert keys == sorted(keys) and set(frame["rank"]) == set(range(1, 8))
    assert all(group["score"].is_monotonic_decreasing for _, group in frame.groupby("query_id"))
    loaded = load_candidates(tmp_path / "out")
    assert list(loaded) == [f"q{i}" for i in range(40)]
    assert [c.rank for c in loaded["q0"]] == list(range(1, 8)) and loaded["q0"][0].chunk is None
    assert loaded["q0"][0].doc_id == frame.iloc[0]["doc_id"]


def test_queries_without_candidates_are_listed_and_warned(planted, tmp_path, capsys):
    corpus, queries, _ = planted
    extra = queries.read_text() + json.dumps({"id": "lost", "prompt": "Zyxxq wuvv", "completion": " qqpz."}) + "\n"
    (tmp_path / "queries.jsonl").write_text(extra)
    manifest = run_prefilter(CorpusSpec(str(corpus), id_field="id"), tmp_path / "queries.jsonl", tmp_path / "out",
                             top_k=3)
    assert manifest["queries_without_candidates"] == ["lost"]
    assert "warning: 1 of 41 queries have no candidate" in capsys.readouterr().err
    assert load_candidates(tmp_path / "out")["lost"] == []


def make_tokenizer_model(directory, texts):
    """A byte-level BPE tokenizer trained here, saved with a config, as --model reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>").save_pretrained(directory)
    GPT2Config(vocab_size=400, n_positions=64, bos_token_id=0, eos_token_id=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer_model(planted, tmp_path_factory):
    texts = [json.loads(line)["text"] for line in planted[0].read_text().splitlines()]
    return make_tokenizer_model(tmp_path_factory.mktemp("tok"), texts)


def test_sequence_unit_gives_chunks(planted, tokenizer_model, tmp_path):
    """Chunks of 16 tokens: rows name a chunk, and the fact's chunk is found for most queries."""
    manifest = prefilter(planted, tmp_path / "out", unit="sequence", model=str(tokenizer_model), max_length=16)
    frame = candidates_frame(tmp_path / "out")
    assert frame["chunk"].notna().all() and (frame["chunk"] > 0).any()
    assert manifest["counts"]["items"] > manifest["counts"]["documents"]
    top = frame[frame["rank"] == 1]
    assert sum(top.set_index("query_id")["doc_id"].get(q) == d for q, d in planted[2].items()) >= 0.9 * 40
    loaded = load_candidates(tmp_path / "out")
    assert all(isinstance(c.chunk, int) for c in loaded["q1"])


def test_model_analyzer(planted, tokenizer_model, tmp_path):
    """Observed: 40/40 first with the model's BPE tokens as terms (1-2 grams); assert >= 90%."""
    prefilter(planted, tmp_path / "out", analyzer="model", model=str(tokenizer_model), ngram_range=(1, 2))
    assert first_rank_fraction(candidates_frame(tmp_path / "out"), planted[2]) >= 0.9


def test_top_k_keeps_best_and_breaks_ties_by_order():
    top = TopK(n_queries=2, k=3)
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((50, 2)), 1)  # many ties
    for start in range(0, 50, 7):
        batch = scores[start : start + 7]
        top.push(batch, start, [f"d{start + i}" for i in range(len(batch))], [-1] * len(batch))
    for query in range(2):
        expected = sorted((i for i in range(50) if scores[i, query] > 0), key=lambda i: (-scores[i, query], i))[:3]
        got_scores, doc_ids, _ = top.result(query)
        assert list(doc_ids) == [f"d{i}" for i in expected]
        assert list(got_scores) == [scores[i, query] for i in expected]


def test_resume_after_crash_reuses_first_pass(planted, tmp_path, monkeypatch, capsys):
    import attrib.stages.prefilter as stage

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(stage.TopK, "push", crash)
    with pytest.raises(RuntimeError):
        prefilter(planted, tmp_path / "out", backend="streaming")
    assert (tmp_path / "out" / FREQUENCIES_FILE).exists() and not (tmp_path / "out" / CANDIDATES_FILE).exists()
    with pytest.raises(InputError, match="unfinished"):
        load_candidates(tmp_path / "out")
    monkeypatch.undo()
    monkeypatch.setattr(stage, "_count_frequencies", crash)  # the rerun must not count again
    prefilter(planted, tmp_path / "out", backend="streaming")
    assert not (tmp_path / "out" / FREQUENCIES_FILE).exists()
    monkeypatch.undo()
    prefilter(planted, tmp_path / "fresh", backend="streaming")
    assert candidates_frame(tmp_path / "out").equals(candidates_frame(tmp_path / "fresh"))

    written = (tmp_path / "out" / CANDIDATES_FILE).stat().st_mtime_ns
    capsys.readouterr()
    prefilter(planted, tmp_path / "out", backend="streaming")
    assert "already complete" in capsys.readouterr().err
    assert (tmp_path / "out" / CANDIDATES_FILE).stat().st_mtime_ns == written


def test_auto_backend_by_size(tmp_path, monkeypatch):
    import attrib.stages.prefilter as stage

    corpus = write_rows(tmp_path / "c.jsonl", [{"text": "some words here"}] * 10)
    assert stage.choose_backend(CorpusSpec(str(corpus)), "auto") == "exact"
    monkeypatch.setattr(stage, "AUTO_EXACT_MAX_BYTES", 10)
    assert stage.choose_backend(CorpusSpec(str(corpus)), "auto") == "streaming"
    assert stage.choose_backend(CorpusSpec(str(corpus), max_docs=5), "auto") == "exact"


def generated_corpus(path, n_docs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(5000)])
    drawn = words[rng.zipf(1.3, size=n_docs * 12) % 5000].reshape(n_docs, 12)
    return write_rows(path, ({"text": " ".join(row)} for row in drawn))


def test_streaming_memory_is_flat(tmp_path):
    """Peak traced memory scoring 30k documents exceeds that of 3k by less than 4 MiB.

    Observed: 6.7 and 7.4 MiB (hash tables of 2**18 features, one batch, the top-k).
    """
    queries = write_rows(tmp_path / "q.jsonl", [{"id": f"q{i}", "prompt": f"w{i} w{2 * i + 1}", "completion": f" w{i + 7}"}
                                                for i in range(20)])
    peaks = []
    for n_docs in (3_000, 30_000):
        corpus = generated_corpus(tmp_path / f"c{n_docs}.jsonl", n_docs)
        tracemalloc.start()
        run_prefilter(CorpusSpec(str(corpus)), queries, tmp_path / f"out{n_docs}", top_k=50, backend="streaming",
                      hash_features=2**18)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    print(f"peak traced MiB: {[round(p / 2**20, 2) for p in peaks]}")
    assert peaks[1] - peaks[0] < 4 * 2**20, [p / 2**20 for p in peaks]


# --- command line ---------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str]:
    from attrib.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def test_cli_writes_candidates(planted, tmp_path, capsys):
    corpus, queries, sources = planted
    from attrib.cli import main

    main(["prefilter", "--corpus", str(corpus), "--id-field", "id", "--queries", str(queries), "--out",
          str(tmp_path / "out"), "--top-k", "5", "--ngram-range", "1,2", "--scoring", "bm25", "--quiet"])
    assert first_rank_fraction(candidates_frame(tmp_path / "out"), sources) >= 0.9
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stage"] == "prefilter" and manifest["status"] == "complete"
    assert manifest["settings"]["ngram_range"] == [1, 2] and manifest["settings"]["scoring"] == "bm25"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("top-k 0", "--top-k 0"),
        ("empty corpus", "holds no usable document"),
        ("empty query text", "query q0: its prompt text is empty"),
        ("missing corpus", "no such file"),
        ("missing queries", "--queries"),
        ("no terms", "no document of the corpus has a term"),
        ("sequence without model", "--unit sequence needs --model"),
        ("bad ngram range", "--ngram-range"),
        ("bad scoring", "--scoring cosine"),
        ("bad row after the first", "c.jsonl:3: invalid JSON"),
        ("max-length 0", "--max-length"),
        ("bad long-documents", "--long-documents drop"),
    ],
)
def test_cli_bad_input_is_one_line(planted, tmp_path, capsys, case, expected):
    corpus, queries, _ = planted
    args = {"--corpus": corpus, "--queries": queries, "--out": tmp_path / "out", "--top-k": 5}
    extra: list[str] = []
    if case == "top-k 0":
        args["--top-k"] = 0
    elif case == "empty corpus":
        args["--corpus"] = write_rows(tmp_path / "empty.jsonl", [])
    elif case == "empty query text":
        args["--queries"] = write_rows(tmp_path / "q.jsonl", [{"id": "q0", "prompt": "", "completion": " Quendar."}])
        extra = ["--query-text", "prompt"]
    elif case == "missing corpus":
        args["--corpus"] = tmp_path / "nowhere.jsonl"
    elif case == "missing queries":
        args["--queries"] = tmp_path / "nowhere.jsonl"
    elif case == "no terms":  # found only after a pass over the corpus, whose progress bar --quiet hides
        args["--corpus"] = write_rows(tmp_path / "short.jsonl", [{"text": "a b c !"}] * 3)
        extra = ["--quiet"]
    elif case == "sequence without model":
        extra = ["--unit", "sequence"]
    elif case == "bad ngram range":
        extra = ["--ngram-range", "2-1"]
    elif case == "bad scoring":
        extra = ["--scoring", "cosine"]
    elif case == "bad row after the first":  # found after the output directory exists
        args["--corpus"] = tmp_path / "c.jsonl"
        args["--corpus"].write_text('{"text": "the capital"}\n{"text": "of rivers"}\n{not json\n')
        extra = ["--quiet"]
    elif case == "max-length 0":
        extra = ["--max-length", "0"]
    elif case == "bad long-documents":
        extra = ["--long-documents", "drop"]
    argv = ["prefilter", *[str(x) for pair in args.items() for x in pair], *extra]
    code, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_resume_refuses_a_changed_corpus(planted, tmp_path, monkeypatch):
    """An unfinished run on corpus A is not continued on corpus B (nor on edited queries)."""
    import shutil

    import attrib.stages.prefilter as stage

    corpus, queries, _ = planted
    copy = shutil.copy(corpus, tmp_path / "corpus.jsonl")
    spec = CorpusSpec(str(copy))
    monkeypatch.setattr(stage.TopK, "push", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        run_prefilter(spec, queries, tmp_path / "out", top_k=5, backend="streaming")
    monkeypatch.undo()
    with open(copy, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "new", "text": "another document"}) + "\n")
    with pytest.raises(InputError, match=r"other inputs \(corpus changed since\); use overwrite="):
        run_prefilter(spec, queries, tmp_path / "out", top_k=5, backend="streaming")
    edited = write_rows(tmp_path / "q.jsonl", [{"id": "q0", "prompt": "The capital of", "completion": " x"}])
    run_prefilter(spec, edited, tmp_path / "done", top_k=5)
    write_rows(edited, [{"id": "q0", "prompt": "The river of", "completion": " y"}])
    with pytest.raises(InputError, match=r"other inputs \(queries changed since\)"):
        run_prefilter(spec, edited, tmp_path / "done", top_k=5)


def test_sequence_candidates_refuse_other_chunking(planted, tokenizer_model, tokenizer, tmp_path):
    """Chunk k is the same text only with the same tokenizer, --max-length and --long-documents."""
    from transformers import AutoTokenizer

    from attrib.stages.prefilter import check_candidates_chunking

    manifest = prefilter(planted, tmp_path / "seq", unit="sequence", model=str(tokenizer_model), max_length=16)
    own = AutoTokenizer.from_pretrained(tokenizer_model)
    assert manifest["chunking"]["max_length"] == 16 and manifest["settings"]["long_documents"] == "chunk"
    check_candidates_chunking(manifest, own, 16, "chunk")
    for args, fragment in (
        ((own, 32, "chunk"), "max_length=16 != 32"),
        ((own, 16, "truncate"), "long_documents='chunk' != truncate"),
        ((tokenizer, 16, "chunk"), "tokenizer"),
    ):
        with pytest.raises(InputError, match="cut into sequences differently") as error:
            check_candidates_chunking(manifest, *args)
        assert fragment in str(error.value) and "--overwrite" in str(error.value) and "\n" not in str(error.value)
    documents = prefilter(planted, tmp_path / "doc")
    check_candidates_chunking(documents, tokenizer, 32, "truncate")  # whole documents do not depend on chunking
