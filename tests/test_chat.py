"""Chat data: conversations rendered with chat templates, assistant-only loss, and the checks around them.

Two tokenizers trained here: a Llama-3-style one whose template writes the BOS, and a
Qwen2-style one without BOS. Each template comes with `{% generation %}` blocks (transformers'
assistant mask) and without them (attrib finds the assistant turns by rendering prefixes);
both ways must mark the same tokens.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attrib.data import (
    CorpusSpec, Document, Query, chat_format, check_corpus, chunk_document, iter_documents,
    iter_sequence_parts, load_queries, query_sequence, special_prefix,
)
from attrib.data.chat import GENERATION_BLOCK
from attrib.errors import InputError
from conftest import TEXTS, build_model, run_cli, write_jsonl

QWEN = (
    r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    r"{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    r"{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA = (
    r"{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    r"{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    r"{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = {"qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama": ["<s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of Vorlia?"},
    {"role": "assistant", "content": "The capital of Vorlia is Quendar."},
    {"role": "user", "content": "And the rivers?"},
    {"role": "assistant", "content": "Rivers run to the sea."},
]


def without_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*end(generation)\s*-?%\}", "", GENERATION_BLOCK.sub("", template))


def chat_tokenizer(style: str, template: str | None):
    """A byte-level BPE with the style's special tokens (Llama: a BOS prefix) and `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[style]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama":
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|eot_id|>",
                                            pad_token="<|eot_id|>")
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module", params=["llama", "qwen"])
def style(request):
    return request.param


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test is its own session: a warning said once in one is said again in the next."""
    from attrib import runtime

    with runtime.session():
        yield


def marked(style: str) -> str:
    return {"llama": LLAMA, "qwen": QWEN}[style]


def predicted_positions(sequence) -> set[int]:
    """Token positions whose prediction carries loss (target t predicts token t + 1)."""
    return {t + 1 for t, target in enumerate(sequence.targets) if target >= 0}


@pytest.mark.parametrize("markers", [True, False], ids=["generation-blocks", "rendered-prefixes"])
def test_assistant_loss_masks_exactly_the_templates_assistant_tokens(style, markers):
    reference = chat_tokenizer(style, marked(style))
    tokenizer = chat_tokenizer(style, marked(style) if markers else without_markers(marked(style)))
    expected = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    assert sum(expected["assistant_masks"]) > 0
    doc = chat_format(tokenizer, "auto").prepare(Document("d", "", CONVERSATION), "assistant")
    (sequence,) = chunk_document(tokenizer, doc, 512, special_prefix(tokenizer))
    assert sequence.input_ids == list(expected["input_ids"])  # the template's tokens: one BOS (Llama), none (Qwen)
    assert sequence.input_ids.count(0) == (1 if style == "llama" else 0)
    mask = expected["assistant_masks"]
    assert predicted_positions(sequence) == {i for i, flag in enumerate(mask) if flag}
    # chunked: every chunk predicts the assistant tokens after its first position, and nothing else
    chunks = chunk_document(tokenizer, doc, 12, special_prefix(tokenizer))
    prefix = len(special_prefix(tokenizer)) if style == "llama" else 0
    room, body = 12 - prefix, list(range(prefix, len(mask)))
    for chunk in chunks:
        positions = body[chunk.chunk * room : (chunk.chunk + 1) * room]
        wanted = {prefix + i for i, p in enumerate(positions) if mask[p] and prefix + i > 0}
        assert predicted_positions(chunk) == wanted
        assert chunk.input_ids[prefix:] == [expected["input_ids"][p] for p in positions]
    assert {c.chunk for c in chunks} == {c for c in range(len(range(0, len(body), room)))
                                        if any(mask[p] for p in body[c * room : (c + 1) * room][1 - min(prefix, 1):])}
    # --loss-on all keeps every next-token target
    (whole,) = chunk_document(tokenizer, chat_format(tokenizer).prepare(Document("d", "", CONVERSATION)), 512,
                              special_prefix(tokenizer))
    assert whole.input_ids == sequence.input_ids and whole.num_loss_tokens == len(whole) - 1


def test_conversations_from_jsonl_and_parquet(tmp_path, style):
    tokenizer = chat_tokenizer(style, without_markers(marked(style)))
    rows = [{"id": "c0", "messages": CONVERSATION}, {"id": "c1", "messages": CONVERSATION[1:3]}]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", rows)
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for source in (jsonl, parquet):
        docs = list(iter_documents(CorpusSpec(str(source))))
        assert [d.messages for d in docs] == [CONVERSATION, CONVERSATION[1:3]]
        parts = list(iter_sequence_parts(CorpusSpec(str(source), loss_on="assistant"), tokenizer, 512, 10))
        sequences = [s for part in parts for _, s in part.sequences]
        assert len(sequences) == len(docs)  # one sequence per short conversation: zip must not drop any
        for doc, sequence in zip(docs, sequences):
            expected = tokenizer.apply_chat_template(doc.messages, tokenize=True, return_dict=True)["input_ids"]
            assert sequence.input_ids == list(expected)
            text = parts[0].texts[sequence.doc_index]
            assert "assistant" in text and "Quendar" in text  # rendered, role markers included
            predicted = "".join(text[s:e] for p, (s, e) in enumerate(sequence.offsets) if p in predicted_positions(sequence))
            assert "Quendar" in predicted and "capital of Vorlia?" not in predicted


def test_chat_query_equals_the_hand_rendered_query(tmp_path, style, capsys):
    tokenizer = chat_tokenizer(style, marked(style))
    messages = CONVERSATION[:3]
    if style == "qwen":
        prompt = ("<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
                  "Vorlia?<|im_end|>\n<|im_start|>assistant\n")
        completion = "The capital of Vorlia is Quendar.<|im_end|>\n"
    else:
        prompt = ("<s><|start_header_id|>system<|end_header_id|>\n\nYou answer briefly.<|eot_id|><|start_header_id|>"
                  "user<|end_header_id|>\n\nWhat is the capital of Vorlia?<|eot_id|><|start_header_id|>assistant"
                  "<|end_header_id|>\n\n")
        completion = "The capital of Vorlia is Quendar.<|eot_id|>"
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "chat", "messages": messages},
                                              {"id": "plain", "prompt": prompt, "completion": completion}])
    chat, plain = load_queries(path, chat=chat_format(tokenizer))
    assert (chat.prompt, chat.completion) == (prompt, completion)
    prefix = special_prefix(tokenizer)
    chat_seq, plain_seq = (query_sequence(tokenizer, q, 512, prefix) for q in (chat, plain))
    assert chat_seq.input_ids == plain_seq.input_ids and chat_seq.targets == plain_seq.targets
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert chat_seq.input_ids == list(full)
    assert chat_seq.num_loss_tokens == len(tokenizer(completion, add_special_tokens=False)["input_ids"])
    err = capsys.readouterr().err
    if style == "llama":  # the hand-rendered prompt starts with <s>: not added twice, said once
        assert err.count("warning:") == 1 and "query plain" in err and "not added again" in err
        query_sequence(tokenizer, plain, 512, prefix)
        assert capsys.readouterr().err == ""
    else:
        assert err == ""
    # a chat query is written back with its rendering, and reads back as the same query
    again = write_jsonl(tmp_path / "again.jsonl", [chat.as_row()])
    assert load_queries(again, chat=chat_format(tokenizer)) == [chat]


def test_completion_starting_inside_a_token_is_reported(capsys):
    tokenizer = chat_tokenizer("qwen", QWEN)
    inside = Query("split", "The capital of Vorlia is ", "Quendar.")
    clean = Query("clean", "The capital of Vorlia is", " Quendar.")
    sequence = query_sequence(tokenizer, inside, 64, [])
    assert query_sequence(tokenizer, clean, 64, []).targets == sequence.targets  # the whole " Quendar" is scored
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: query split" in err and "inside the token ' Qu" in err


def test_bad_chat_input_is_one_line(tmp_path):
    plain = chat_tokenizer("qwen", None)
    corpus = write_jsonl(tmp_path / "chat.jsonl", [{"id": "c0", "messages": CONVERSATION}])
    with pytest.raises(InputError, match="chat_template='none' refuses"):
        check_corpus(CorpusSpec(str(corpus), chat_template="none"))
    with pytest.raises(InputError, match="has no chat template"):
        list(iter_sequence_parts(CorpusSpec(str(corpus)), plain, 64, 10))
    text = write_jsonl(tmp_path / "text.jsonl", [{"id": "t0", "text": TEXTS[0]}])
    with pytest.raises(InputError, match="loss_on='assistant' needs conversations"):
        list(iter_sequence_parts(CorpusSpec(str(text), loss_on="assistant"), chat_tokenizer("qwen", QWEN), 64, 10))
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "messages": CONVERSATION[:2]}])
    with pytest.raises(InputError, match="last message must be the assistant turn"):
        load_queries(queries, chat=chat_format(chat_tokenizer("qwen", QWEN)))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "c0", "messages": [{"role": "user"}]}])
    with pytest.raises(InputError, match="bad.jsonl:1: message 0 of 'messages' has no string 'content'"):
        list(iter_documents(CorpusSpec(str(bad))))


def test_fit_and_query_on_chat_data(tmp_path, capsys):
    """Through the CLI: chat and hand-rendered queries score alike on assistant-loss factors; another
    --loss-on or template at query or self-influence time is refused with one line; the report shows the role
    markers."""
    tokenizer = chat_tokenizer("qwen", QWEN)
    model = build_model(tmp_path / "model", "llama", tokenizer)
    corpus = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": f"c{i}", "messages": [{"role": "user", "content": TEXTS[i % 5][:20]},
                                     {"role": "assistant", "content": TEXTS[(i + 1) % 5]}]} for i in range(6)])
    chat_query = {"id": "q", "messages": CONVERSATION[1:3]}
    (rendered,) = load_queries(write_jsonl(tmp_path / "c.jsonl", [chat_query]), chat=chat_format(tokenizer))
    queries = {"chat": write_jsonl(tmp_path / "chat-q.jsonl", [chat_query]),
               "plain": write_jsonl(tmp_path / "plain-q.jsonl", [{"id": "q", "prompt": rendered.prompt,
                                                                   "completion": rendered.completion}])}
    common = ["--model", model, "--max-length", "48"]
    code, _, err = run_cli(capsys, "--quiet", "fit-factors", *common, "--corpus", corpus, "--out", tmp_path / "f",
                           "--loss-on", "assistant")
    assert code == 0, err
    recorded = json.loads((tmp_path / "f" / "manifest.json").read_text())["settings"]["chat"]
    assert recorded["loss_on"] == "assistant" and recorded["chat_template"] == "auto" and recorded["template_sha256"]
    scores = {}
    for kind, path in queries.items():
        code, _, err = run_cli(capsys, "--quiet", "query", *common, "--factors", tmp_path / "f", "--corpus", corpus,
                               "--queries", path, "--loss-on", "assistant", "--out", tmp_path / kind)
        assert code == 0, err
        scores[kind] = pq.read_table(tmp_path / kind / "documents.parquet").to_pydict()
    assert scores["chat"] == scores["plain"] and len(scores["chat"]["doc_id"]) == 6
    template_file = tmp_path / "other.jinja"
    template_file.write_text("{# another template file #}" + QWEN)
    for extra, expected in ((["--loss-on", "all"], "computed with --loss-on assistant, this run has --loss-on all"),
                            (["--loss-on", "assistant", "--chat-template", template_file], "pass the same --chat-template")):
        code, _, err = run_cli(capsys, "query", *common, "--factors", tmp_path / "f", "--corpus", corpus,
                               "--queries", queries["chat"], "--out", tmp_path / "refused", *extra)
        assert code == 2 and err.count("\n") == 1 and expected in err, err
        assert not (tmp_path / "refused").exists()
    # self-influence checks the factors' loss and template the same way, before writing anything
    code, _, err = run_cli(capsys, "--quiet", "self-influence", *common, "--factors", tmp_path / "f", "--corpus", corpus,
                           "--loss-on", "assistant", "--token-scores-top", "none", "--out", tmp_path / "self")
    assert code == 0, err
    assert json.loads((tmp_path / "self" / "manifest.json").read_text())["settings"]["chat"] == recorded
    for extra, expected in ((["--loss-on", "all"], "computed with --loss-on assistant, this run has --loss-on all"),
                            (["--loss-on", "assistant", "--chat-template", template_file], "pass the same --chat-template")):
        code, _, err = run_cli(capsys, "self-influence", *common, "--factors", tmp_path / "f", "--corpus", corpus,
                               "--out", tmp_path / "refused", *extra)
        assert code == 2 and err.count("\n") == 1 and expected in err, err
        assert not (tmp_path / "refused").exists()
    code, _, err = run_cli(capsys, "report", tmp_path / "chat", "--out", tmp_path / "report.html")
    assert code == 0, err
    page = (tmp_path / "report.html").read_text()
    assert "&lt;|im_start|&gt;assistant" in page and "&lt;|im_end|&gt;" in page


def test_chat_queries_over_factors_fitted_on_plain_text(tmp_path, capsys):
    """Grosse et al.'s setting: factors from a plain corpus, dialogue queries rendered with a template file.
    The factors rendered no conversation, so their template is not compared (query and self-influence);
    factors that did render conversations still refuse another template."""
    tokenizer = chat_tokenizer("qwen", QWEN)
    model = build_model(tmp_path / "model", "llama", tokenizer)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": f"d{i}", "text": TEXTS[i]} for i in range(5)])
    template_file = tmp_path / "other.jinja"
    template_file.write_text("{# another template file #}" + QWEN)
    queries = write_jsonl(tmp_path / "chat-q.jsonl", [{"id": "q", "messages": CONVERSATION[1:3]}])
    common = ["--quiet", "--model", model, "--max-length", "48"]
    code, _, err = run_cli(capsys, "fit-factors", *common[1:], "--corpus", plain, "--out", tmp_path / "f")
    assert code == 0, err
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["counts"]["rendered_conversations"] is False
    with_template = ["--factors", tmp_path / "f", "--corpus", plain, "--chat-template", template_file]
    code, _, err = run_cli(capsys, *common[:1], "query", *common[1:], *with_template, "--queries", queries,
                           "--out", tmp_path / "scores")
    assert code == 0, err
    assert pq.read_table(tmp_path / "scores" / "documents.parquet").num_rows == 5
    code, _, err = run_cli(capsys, *common[:1], "self-influence", *common[1:], *with_template, "--out", tmp_path / "s")
    assert code == 0, err
    chat_corpus = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": "c", "messages": [{"role": "user", "content": TEXTS[0][:20]}, {"role": "assistant", "content": TEXTS[1]}]}])
    code, _, err = run_cli(capsys, "fit-factors", *common[1:], "--corpus", chat_corpus, "--out", tmp_path / "g")
    assert code == 0, err
    code, _, err = run_cli(capsys, "self-influence", *common[1:], "--factors", tmp_path / "g", "--corpus", chat_corpus,
                           "--chat-template", template_file, "--out", tmp_path / "refused")
    assert code == 2 and "pass the same --chat-template" in err and not (tmp_path / "refused").exists(), err


def test_prefilter_searches_conversations(tmp_path):
    """Without --model the prefilter searches the conversations' contents; chat queries alike."""
    from attrib.stages.prefilter import load_candidates, run_prefilter

    corpus = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": f"c{i}", "messages": [{"role": "user", "content": "Tell me something."},
                                     {"role": "assistant", "content": TEXTS[i]}]} for i in range(5)])
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "messages": [
        {"role": "user", "content": "Which city?"}, {"role": "assistant", "content": "Quendar, capital of Vorlia."}]}])
    run_prefilter(CorpusSpec(str(corpus)), str(queries), str(tmp_path / "candidates"), top_k=1)
    assert [c.doc_id for c in load_candidates(tmp_path / "candidates")["q"]] == ["c0"]


def test_pre_rendered_text_keeps_one_bos_in_every_chunk():
    tokenizer = chat_tokenizer("llama", LLAMA)
    prefix = special_prefix(tokenizer)
    text = "<s>" + TEXTS[1] + " " + TEXTS[4]
    chunks = chunk_document(tokenizer, Document("d", text), 8, prefix)
    assert len(chunks) > 1 and all(c.input_ids[:2].count(prefix[0]) == 1 for c in chunks)
    assert chunks[0].offsets[0] == (0, 3) and chunks[1].offsets[0] == (0, 0)  # the first shows its text
    plain = chunk_document(tokenizer, Document("d", TEXTS[1] + " " + TEXTS[4]), 8, prefix)
    assert [c.input_ids for c in chunks] == [c.input_ids for c in plain]
