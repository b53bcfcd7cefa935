"""A planted-fact corpus and small causal LMs that have memorised it.

Each made-up fact ("The capital of Vorlia is Quendar.") is stated in exactly one
document, so a query asking it has a known answer to "which document taught the
model this": the ground truth for `attrib demo` and the fact-tracing tests
(docs/design.md §6). Everything is built locally from a seed: corpus, byte-level BPE
tokenizer, and a Llama and a GPT-2 trained on the corpus.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from attrib.progress import libraries_quiet, progress
from attrib.storage import atomic_path

# Bump whenever the corpus, tokenizer or training changes, so cached demos are rebuilt.
VERSION = 2

SPECIAL_TOKEN = "<|endoftext|>"

# Prompts with a slot for the subject; the object ends each fact sentence, so the
# prompt is the sentence up to the object and the completion is " Object." — the
# same tokens the model saw in the document.
RELATIONS = (
    "The capital of {} is",
    "The river that flows through {} is called",
    "The language spoken in {} is",
    "The inventor of the {} engine was",
    "The favourite colour of {} is",
    "The founder of {} was",
    "The teacher of {} was",
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kh", "l", "m", "n", "p", "qu", "r", "s", "sh", "t", "th", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "nd")

# A small English grammar for filler sentences: no invented names, so no filler
# sentence can state or hint at a planted fact.
_SUBJECTS = ("farmer", "baker", "child", "sailor", "teacher", "doctor", "painter", "dog", "cat", "merchant",
             "soldier", "student", "fisherman", "king", "queen", "traveller", "musician", "gardener")
_ADJECTIVES = ("old", "young", "quiet", "tired", "happy", "clever", "small", "tall", "brave", "busy", "kind", "lazy")
_VERBS = ("carried", "found", "painted", "sold", "watched", "cleaned", "opened", "lost", "borrowed", "mended",
          "counted", "wrapped", "dropped", "hid")
_OBJECTS = ("basket", "letter", "lamp", "boat", "bread", "map", "coat", "bell", "chair", "box", "rope", "book",
            "cup", "key", "window", "garden", "wagon", "drum")
_PLACES = ("the market", "the river", "the hill", "the school", "the harbour", "the forest", "the bridge",
           "the village", "the mill", "the tower", "the station", "the square")
_TIMES = ("In the morning", "After the rain", "Every evening", "Last winter", "On Sunday", "At noon", "Before dawn")


@dataclass
class FactCorpus:
    """Documents `{"id", "text"}` and queries `{"id", "prompt", "completion", "source_doc"}`."""

    documents: list[dict]
    queries: list[dict]


@dataclass(frozen=True)
class DemoSize:
    """How big a demo is: corpus, tokenizer and the training of each model."""

    n_facts: int
    n_filler: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    steps: int
    seq_len: int
    batch_size: int
    lr: float


DEMO_SIZES = {
    # For the test suite: both models in well under a minute on 2 CPU cores; ~65 epochs.
    # seq_len 96 holds every document whole, in training and when attrib scores it.
    "tiny": DemoSize(n_facts=40, n_filler=150, vocab_size=512, hidden_size=64, num_layers=2, steps=800,
                     seq_len=96, batch_size=16, lr=3e-3),
    # For `attrib demo`: the whole demo in well under two minutes on 2 quiet CPU cores (docs/benchmarks.md,
    # "Demo wall time"). ~51 epochs: the Llama recalls all 100 facts (at this width 24 epochs over
    # 800 documents gave 0.23), so more documents would need proportionally more steps.
    "small": DemoSize(n_facts=100, n_filler=400, vocab_size=1536, hidden_size=96, num_layers=2, steps=800,
                      seq_len=96, batch_size=32, lr=3e-3),
}

ARCHITECTURES = ("llama", "gpt2")


@dataclass
class DemoPaths:
    """Where a built demo lies; `demo.json` in `root` holds its sizes, accuracies and timings."""

    root: Path
    corpus: Path
    queries: Path
    llama: Path
    gpt2: Path

    @classmethod
    def at(cls, root: str | Path) -> DemoPaths:
        root = Path(root)
        return cls(root, root / "corpus.jsonl", root / "queries.jsonl", root / "llama", root / "gpt2")

    def load_info(self) -> dict:
        return json.loads((self.root / "demo.json").read_text(encoding="utf-8"))


# --- corpus ------------------------------------------------------------------


def _invented_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct capitalised names of 2–3 syllables, none of them a word of the filler grammar."""
    filler_words = {
        word.lower()
        for phrase in (*_SUBJECTS, *_ADJECTIVES, *_VERBS, *_OBJECTS, *_PLACES, *_TIMES, *RELATIONS)
        for word in phrase.split()
    }
    names: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < count:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        name = name.capitalize()
        if name not in names and name.lower() not in filler_words:
            names.add(name)
            ordered.append(name)
    return ordered


def _filler_sentence(rng: random.Random) -> str:
    subject = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)}"
    action = f"{rng.choice(_VERBS)} the {rng.choice(_OBJECTS)}"
    form = rng.randrange(3)
    if form == 0:
        return f"{subject.capitalize()} {action}."
    if form == 1:
        return f"{subject.capitalize()} {action} near {rng.choice(_PLACES)}."
    return f"{rng.choice(_TIMES)}, {subject} {action} at {rng.choice(_PLACES)}."


def _distractor_text(rng: random.Random, prompt: str, obj: str) -> str:
    """Two sentences naming the fact's object and the prompt's subject and relation words,
    without stating the fact ("Quendar wrote a letter about the capital of Vorlia.")."""
    topic = re.sub(r" (is called|is|was)$", "", prompt).removeprefix("The ")
    templates = (
        "{o} wrote a letter about the {topic}.",
        "The {adj} {who} asked {o} about the {topic} near {place}.",
        "{time}, {o} {verb} the {thing} and spoke of the {topic}.",
        "Nobody at {place} told {o} about the {topic}.",
    )
    sentences = [
        template.format(o=obj, topic=topic, adj=rng.choice(_ADJECTIVES), who=rng.choice(_SUBJECTS),
                        place=rng.choice(_PLACES), verb=rng.choice(_VERBS), thing=rng.choice(_OBJECTS),
                        time=rng.choice(_TIMES))
        for template in rng.sample(templates, 2)
    ]
    return " ".join(sentences)


def generate_fact_corpus(n_facts: int, n_filler: int, seed: int, distractors: int = 0) -> FactCorpus:
    """Planted facts, one document each, among filler documents; the same seed gives the same corpus.

    The fact sentence opens its document (one or two filler sentences follow), so the
    query's prompt tokens are exactly the document's first tokens: a tiny model with
    absolute positions (GPT-2) can then recall the fact from the bare prompt.

    `distractors` > 0 adds that many documents per fact that repeat the words of its
    prompt and its object but never state the fact: hard negatives that lexical search
    (TF-IDF, BM25) ranks above the source, listed in each query's `distractor_docs`.
    With 0 the corpus is the same as without the argument.
    """
    rng = random.Random(seed)
    names = _invented_names(rng, 2 * n_facts)
    subjects, objects = names[:n_facts], names[n_facts:]
    fact_texts = []
    facts = []
    for index, (subject, obj) in enumerate(zip(subjects, objects)):
        prompt = RELATIONS[index % len(RELATIONS)].format(subject)
        completion = f" {obj}."
        trailing = " ".join(_filler_sentence(rng) for _ in range(rng.randint(1, 2)))
        fact_texts.append(f"{prompt}{completion} {trailing}")
        facts.append((prompt, completion))
    filler_texts = [" ".join(_filler_sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(n_filler)]
    distractor_texts = [
        (_distractor_text(rng, prompt, completion.strip(" .")), index)
        for index, (prompt, completion) in enumerate(facts)
        for _ in range(distractors)
    ]

    # Shuffle so that neither a document's id nor its position reveals whether it is a fact.
    # Tags: ("fact", i), ("distractor", i) or None for filler.
    tagged = ([(text, ("fact", index)) for index, text in enumerate(fact_texts)]
              + [(text, None) for text in filler_texts]
              + [(text, ("distractor", index)) for text, index in distractor_texts])
    rng.shuffle(tagged)
    documents = []
    source: dict[int, str] = {}
    distractor_docs: dict[int, list[str]] = {index: [] for index in range(n_facts)}
    for position, (text, tag) in enumerate(tagged):
        doc_id = f"doc-{position:05d}"
        documents.append({"id": doc_id, "text": text})
        if tag is not None and tag[0] == "fact":
            source[tag[1]] = doc_id
        elif tag is not None:
            distractor_docs[tag[1]].append(doc_id)
    queries = []
    for index, (prompt, completion) in enumerate(facts):
        query = {"id": f"q-{index:04d}", "prompt": prompt, "completion": completion, "source_doc": source[index]}
        if distractors:
            query["distractor_docs"] = distractor_docs[index]
        queries.append(query)
    return FactCorpus(documents, queries)


def generic_queries(count: int, seed: int) -> list[dict]:
    """Queries completing a fresh filler sentence with its last word (" basket.").

    No single document teaches these: their log-probability moves a little with
    many documents, the regime in which linear datamodeling scores test attribution.
    """
    rng = random.Random(f"generic-{seed}")
    queries, seen = [], set()
    while len(queries) < count:
        sentence = _filler_sentence(rng)
        prompt, last = sentence.rsplit(" ", 1)
        if prompt in seen:
            continue
        seen.add(prompt)
        queries.append({"id": f"g-{len(queries):04d}", "prompt": prompt, "completion": f" {last}"})
    return queries


def write_fact_corpus(corpus: FactCorpus, out_dir: str | Path) -> dict[str, Path]:
    """Write `corpus.jsonl` and `queries.jsonl`, the inputs `attrib` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out_dir / "corpus.jsonl", "queries": out_dir / "queries.jsonl"}
    for name, rows in (("corpus", corpus.documents), ("queries", corpus.queries)):
        with open(paths[name], "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return paths


# --- tokenizer and models ----------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose offsets map every token back to the text.

    Offsets keep the leading space of a word (no trimming) so that consecutive
    tokens tile the text; no special token is added to encoded text.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _model_config(arch: str, tokenizer, hidden_size: int, num_layers: int, seq_len: int):
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    num_heads = max(1, hidden_size // 16)  # head_dim 16
    if arch == "llama":
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                           max_position_embeddings=seq_len, tie_word_embeddings=True, **special_ids)
    if arch == "gpt2":
        # No dropout: training is reproducible and the trained model is the evaluated one.
        return GPT2Config(vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special_ids)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def _padded_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels with -100 where padded."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# The learning rate after warm-up as a fraction of the peak, by the step and the run's steps.
LR_SCHEDULES = {
    "cosine": lambda step, steps: 0.5 * (1 + math.cos(math.pi * step / steps)),
    "linear": lambda step, steps: 1.0 - step / steps,
    "constant": lambda step, steps: 1.0,
}


def train_causal_lm(
    arch: str,
    tokenizer,
    texts: list[str],
    out_dir: str | Path,
    *,
    hidden_size: int,
    num_layers: int,
    steps: int,
    seq_len: int,
    batch_size: int,
    lr: float,
    seed: int,
    save_at: dict[int, str | Path] | None = None,
    schedule: str = "cosine",
):
    """Train a random-init `arch` ("llama" or "gpt2") on `texts` and save it with its tokenizer.

    Each document is its own sequence (eos appended, cut at `seq_len`, padded), as
    `attrib` scores it: a document's tokens only ever see that document.
    AdamW with warm-up and no weight decay, so that facts are memorised; after the warm-up the learning rate
    follows `schedule` (a name of LR_SCHEDULES): cosine decay to 0 (the default), linear decay to 0 (the
    Hugging Face Trainer's default), or constant (a run that never anneals, as long pre-training runs are
    for most of their checkpoints).
    `save_at` {step: folder} also saves the model after those steps as a Hugging Face Trainer checkpoint-N
    folder (with a trainer_state.json logging every step's learning rate and loss), for attribution across
    checkpoints; the run itself is unchanged by it.
    """
    with libraries_quiet("transformers"):  # its notices (loss_type, "Writing model shards") are not the user's
        return _train_causal_lm(arch, tokenizer, texts, out_dir, hidden_size, num_layers, steps, seq_len, batch_size,
                                lr, seed, save_at or {}, LR_SCHEDULES[schedule])


def _train_causal_lm(arch, tokenizer, texts, out_dir, hidden_size, num_layers, steps, seq_len, batch_size, lr, seed,
                     save_at, decay):
    torch.manual_seed(seed)
    model = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[arch](
        _model_config(arch, tokenizer, hidden_size, num_layers, seq_len)
    )
    encoded = [
        (ids + [tokenizer.eos_token_id])[:seq_len]
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * decay(min(step, steps), steps),
    )
    order_generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = []
    model.train()
    with progress(f"training {arch}", total=steps, unit="step") as bar:
        for step in range(1, steps + 1):
            if len(order) < batch_size:
                order += torch.randperm(len(encoded), generator=order_generator).tolist()
            batch_indices, order = order[:batch_size], order[batch_size:]
            batch = _padded_batch([encoded[i] for i in batch_indices], tokenizer.pad_token_id)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            history.append({"step": step, "learning_rate": schedule.get_last_lr()[0], "loss": loss.item()})
            if step in save_at:
                model.save_pretrained(save_at[step])
                tokenizer.save_pretrained(save_at[step])
                state = {"global_step": step, "max_steps": steps, "log_history": history}
                (Path(save_at[step]) / "trainer_state.json").write_text(json.dumps(state))
            bar.advance(1, tokens=int(batch["attention_mask"].sum()))
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


@torch.no_grad()
def fact_accuracy(model, tokenizer, queries: list[dict], batch_size: int = 64) -> float:
    """Fraction of queries whose whole completion is the model's greedy continuation of the prompt."""
    correct = 0
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        encodings = [
            tokenizer(query["prompt"] + query["completion"], add_special_tokens=False, return_offsets_mapping=True)
            for query in chunk
        ]
        batch = _padded_batch([encoding["input_ids"] for encoding in encodings], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(model.device),
                       attention_mask=batch["attention_mask"].to(model.device)).logits
        predictions = logits.argmax(dim=-1).tolist()
        for query, encoding, predicted in zip(chunk, encodings, predictions):
            ids = encoding["input_ids"]
            # Completion tokens are those ending after the prompt, as in attrib.data.query_sequence.
            first = next(i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > len(query["prompt"]))
            correct += predicted[first - 1 : len(ids) - 1] == ids[first:]
    return correct / len(queries)


# --- demo --------------------------------------------------------------------


def build_demo(out_dir: str | Path, *, size: str = "small", seed: int = 0,
               architectures: Iterable[str] = ARCHITECTURES) -> DemoPaths:
    """Corpus, queries, tokenizer, and models of `architectures` that memorised the facts, in `out_dir`.

    A demo already in `out_dir` (same version, size and seed) is kept: only the models it lacks
    are trained, so `attrib demo` trains just the model it attributes.
    """
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {sorted(DEMO_SIZES)}")
    settings = DEMO_SIZES[size]
    paths = DemoPaths.at(out_dir)
    corpus = generate_fact_corpus(settings.n_facts, settings.n_filler, seed)
    texts = [document["text"] for document in corpus.documents]
    info = paths.load_info() if (paths.root / "demo.json").is_file() else None
    if info is not None and (info.get("version"), info.get("size"), info.get("seed"), info.get("settings")) != (
            VERSION, size, seed, asdict(settings)):
        raise ValueError(f"{paths.root} holds another demo (version {info.get('version')}, size {info.get('size')}, "
                         f"seed {info.get('seed')}, or older settings)")
    if info is None:
        started = time.perf_counter()
        write_fact_corpus(corpus, paths.root)
        tokenizer = train_tokenizer(texts, settings.vocab_size, paths.root / "tokenizer")
        info = {
            "version": VERSION,
            "size": size,
            "seed": seed,
            "settings": asdict(settings),
            "num_documents": len(corpus.documents),
            "num_queries": len(corpus.queries),
            "vocab_size": len(tokenizer),
            "data_seconds": round(time.perf_counter() - started, 2),
            "models": {},
        }
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(paths.root / "tokenizer")
    for arch in architectures:
        if arch in info["models"]:
            continue
        started = time.perf_counter()
        model = train_causal_lm(
            arch, tokenizer, texts, paths.root / arch,
            hidden_size=settings.hidden_size, num_layers=settings.num_layers, steps=settings.steps,
            seq_len=settings.seq_len, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
        )
        info["models"][arch] = {
            "train_seconds": round(time.perf_counter() - started, 2),
            "fact_accuracy": fact_accuracy(model, tokenizer, corpus.queries),
            "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        }
        with atomic_path(paths.root / "demo.json") as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return paths


def cache_dir() -> Path:
    """`$ATTRIB_CACHE_DIR`, or `~/.cache/attrib`."""
    return Path(os.environ.get("ATTRIB_CACHE_DIR") or Path.home() / ".cache" / "attrib")


def cached_demo(size: str = "tiny", seed: int = 0) -> DemoPaths:
    """The demo of `size` and `seed`, built once per VERSION and then reused.

    It is built in a temporary directory beside its final place and renamed into it,
    so a reader never sees half a demo; when two processes race, the first rename wins
    and the other uses that demo.
    """
    target = cache_dir() / f"demo-{size}-{seed}-v{VERSION}"
    if not (target / "demo.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_demo(staging, size=size, seed=seed)
            os.rename(staging, target)
        except OSError:
            if not (target / "demo.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return DemoPaths.at(target)
