"""Every option of attrib's stages, defined once: its type, default, help and check.

One dataclass per concern (model, corpus, batching, run, fit, damping, solve, query
gradients, scores, prefilter, index, combine). A stage offers the groups `STAGES` lists for it; the commands'
flags (attrib.commands.stages) and the API's keywords (attrib.api) are generated from
them, so a new option is written here once and appears in both. Checks raise `InputError`
naming the option in the caller's words (`--max-length` or `max_length=`; attrib.runtime.flag).

Nothing here imports torch: `attrib --help` and `import attrib` stay instant.
"""

import functools
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import ClassVar, Optional, Union

from attrib.errors import InputError
from attrib.runtime import flag
from attrib.strategies import STRATEGY

DEFAULT_QUERY_RANK = 32
DEFAULT_INDEX_DIMS = 128  # kronecker index, per side and layer (docs/benchmarks.md, issue 20)
DEFAULT_DAMPING_SCALE = 0.001  # × each layer's mean eigenvalue; chosen on real text (docs/benchmarks.md)
# --solver cg without --solve-iterations: 3 reached the dense ceiling's LDS on real text, and more
# iterations over a small sample over-solve (docs/benchmarks.md, "CG solve: LDS vs iterations")
DEFAULT_SOLVE_ITERATIONS = 3
DEFAULT_SOLVE_TOKENS = 262_144
DEFAULT_HASH_FEATURES = 2**22
SOLVERS = ("ekfac", "cg")
DTYPES = ("float32", "bfloat16", "float16")
LONG_DOCUMENTS = ("chunk", "truncate")
LOSS_ON = ("all", "assistant")
CHAT_TEMPLATES = ("auto", "none")  # or the path of a Jinja template file


def option(default, help: str, *, flags: tuple[str, ...] = (), choices: tuple | None = None,
           minimum: float | None = None, positive: bool = False, cli: bool = True, stage_input: bool = False):
    """A dataclass field that is a user option. `cli=False`: an API keyword only (e.g. `quiet`, a
    global flag of the command line); `stage_input`: a stage directory (a path or a StageResult)."""
    metadata = dict(help=help, flags=flags, choices=choices, minimum=minimum, positive=positive, cli=cli,
                    stage_input=stage_input)
    return field(default=default, metadata=metadata)


class Group:
    """A concern's options; `key` is its attribute on `StageOptions` (`options.corpus.text_field`)."""

    key: ClassVar[str]

    def check(self, options: "StageOptions") -> None:
        """Checks that involve several options (each option's own were made already)."""

    def check_fields(self, offered: set[str]) -> None:
        for item in fields(self):
            value, meta = getattr(self, item.name), item.metadata
            if value is None or item.name not in offered:
                continue
            if meta["choices"] and value not in meta["choices"]:
                raise InputError(f"{flag(item.name, value)} is not one of {', '.join(meta['choices'])}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise InputError(f"{flag(item.name, value)} must be at least {meta['minimum']}")
            if meta["positive"] and value <= 0:
                raise InputError(f"{flag(item.name, value)} must be positive")


# --------------------------------------------------------------------------- groups


@dataclass
class ModelOptions(Group):
    key = "model"
    dtype: str = option("float32", "Model compute dtype: float32, bfloat16 or float16.", choices=DTYPES)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    trust_remote_code: bool = option(False, "Allow the model's own code from the hub.")
    revision: Optional[str] = option(
        None, "Branch, tag or commit of a hub model, e.g. step143000 of a Pythia suite (default: main); recorded with "
        "the model as ID@REVISION. A local directory is one revision already: --revision is refused with it.")


@dataclass
class FitModelOptions(ModelOptions):
    dtype: str = option("auto", "Model compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or "
                        "float16. Statistics accumulate in --stats-dtype.", choices=("auto", *DTYPES))

    def check(self, options: "StageOptions") -> None:
        if self.dtype == "float16":
            raise InputError(f"{flag('dtype', 'float16')} is refused for fit-factors: without loss scaling its "
                             f"gradients underflow to zero or overflow; use {flag('dtype', 'bfloat16')} (same memory, "
                             f"float32's range)")


@dataclass
class CorpusOptions(Group):
    """How a corpus is read and cut into sequences (attrib.data.CorpusSpec with its source)."""

    key = "corpus"
    text_field: str = option("text", "Column holding the document text.")
    id_field: Optional[str] = option(
        None, "Column holding the document id. Default: the `id` column/field where rows have one, else the row "
        "number (a corpus mixing rows with and without `id` is refused); 'none': always row numbers.")
    lines: bool = option(False, "Text files hold one document per line (default: one per file).")
    max_docs: Optional[int] = option(None, "Read at most this many documents.", minimum=1)
    skip_bad_rows: bool = option(False, "Skip and count bad rows instead of stopping.")
    split: str = option("train", "Split of a `datasets` hub corpus.")
    long_documents: str = option(
        "chunk", "Documents longer than --max-length: chunk (score every chunk; packed pre-training) or truncate "
        "(only the first --max-length tokens; models fine-tuned on truncated examples).", choices=LONG_DOCUMENTS)
    chat_template: str = option(
        "auto", "How conversations ('messages' rows and chat queries) are rendered: auto (the tokenizer's chat "
        "template), none (refuse conversations) or the path of a Jinja template file.")
    loss_on: str = option(
        "all", "Tokens of a corpus sequence that carry loss: all, or assistant (only the assistant turns of "
        "conversations, as in supervised fine-tuning). Factors and scores must use the same.", choices=LOSS_ON)

    def check(self, options: "StageOptions") -> None:
        from pathlib import Path

        if self.chat_template not in CHAT_TEMPLATES and not Path(self.chat_template).expanduser().is_file():
            raise InputError(f"{flag('chat_template', self.chat_template)}: not auto, none or a template file")

    @classmethod
    def checked(cls, **reading) -> "CorpusOptions":
        """These options checked as a stage checks them, for callers that build a CorpusSpec themselves."""
        options = cls(**reading)
        options.check_fields(set(reading))
        options.check(None)
        return options

    def spec(self, source: str):
        """The CorpusSpec reading `source` with these options."""
        from attrib.data import CorpusSpec

        return CorpusSpec(source, self.text_field, self.id_field, self.lines, self.max_docs, self.skip_bad_rows,
                          self.split, self.long_documents, self.chat_template, self.loss_on)


@dataclass
class BatchOptions(Group):
    key = "batch"
    max_length: Optional[int] = option(None, "Tokens per sequence (default: the model's context, capped at 2048).",
                                       minimum=2)
    tokens_per_batch: int = option(4096, "Padded tokens per batch (length-sorted packing).", positive=True)
    docs_per_part: int = option(2000, "Documents per part of the corpus and of the output (the resume granularity).",
                                positive=True)


@dataclass
class RunOptions(Group):
    key = "run"
    max_memory: Optional[str] = option(
        None, "Memory per process the stage may plan for (device memory on a GPU, RAM on CPU), e.g. 80GiB. "
        "fit-factors: chooses --layers-per-pass (default: every layer in one pass); query and query-gradients: the "
        "queries per batch and per pass; self-influence: whether every layer's curvature stays on the device "
        "(default: 90% of the GPU, half the RAM on CPU).")
    overwrite: bool = option(False, "Start over in --out instead of resuming.")
    quiet: bool = option(False, "Hide progress bars and status lines.", cli=False)  # the CLI's global --quiet

    @property
    def memory_budget(self) -> int | None:
        from attrib.memory import parse_bytes

        return None if self.max_memory is None else parse_bytes(str(self.max_memory), flag("max_memory"))


@dataclass
class FitOptions(Group):
    key = "fit"
    strategy: str = option("ekfac", "ekfac, kfac, diagonal or identity (gradient dot product).", choices=tuple(STRATEGY))
    fisher: str = option("empirical", "empirical (the data's labels) or true (labels sampled from the model); see "
                         "docs/benchmarks.md.", choices=("empirical", "true"))
    fisher_samples: int = option(1, "Sampled labels per position (true Fisher); more = less noise.", minimum=1)
    max_sequences: Optional[int] = option(None, "Fit on at most this many sequences.", minimum=1)
    max_tokens: Optional[int] = option(None, "Fit on at most this many tokens.", minimum=1)
    covariance_max_tokens: Optional[int] = option(
        None, "Fit A and S (pass 1) on the first this many tokens only; the eigenvalue correction (pass 2) still "
        "sees every token. Saves most of pass 1 on large corpora (see docs/benchmarks.md).", minimum=1)
    stats_dtype: str = option("float32", "Accumulation dtype of the statistics: float32 or float64.",
                              choices=("float32", "float64"))
    layers_per_pass: Optional[int] = option(
        None, "Fit this many layers per pass over the corpus (bounds memory by a group; each group costs a pass). "
        "Default: all in one pass, or what --max-memory allows.", minimum=1)
    checkpoint_every: str = option(
        "10m", "Checkpoint running sums this often (e.g. 10m, 1h; 0 = after every part), and at the end of every pass.")
    tf32: Optional[bool] = option(None, "TF32 matmuls for the float32 statistics (default: on with CUDA).",
                                  flags=("--tf32/--no-tf32",))
    collective_timeout: str = option("6h", "How long a process waits for the others in a collective (several "
                                     "processes).")
    seed: int = option(0, "Seed for sampled labels and shuffling.")
    modules: Optional[str] = option(None, "Regex over module names to track instead of the MLP projections.")

    def check(self, options: "StageOptions") -> None:
        if self.fisher == "empirical" and self.fisher_samples != 1:
            raise InputError(f"{flag('fisher_samples')} applies to {flag('fisher', 'true')} only (the data has "
                             f"one label)")
        if self.layers_per_pass is not None and options.run.max_memory is not None:
            raise InputError(f"give {flag('layers_per_pass')} or {flag('max_memory')}, not both")
        if self.collective_timeout_seconds <= 0:
            raise InputError(f"{flag('collective_timeout')} must be positive")
        parse_duration(str(self.checkpoint_every), "checkpoint_every")  # a bad value fails before any work
        strategy = STRATEGY[self.strategy]
        if self.covariance_max_tokens is not None and not strategy.covariances:
            ignored(flag("covariance_max_tokens"), flag("strategy", self.strategy), "which fits no covariances")
        if self.fisher == "true" and not strategy.has_factors:
            ignored(flag("fisher", "true"), flag("strategy", self.strategy), "which fits nothing")

    @property
    def checkpoint_seconds(self) -> float:
        return parse_duration(str(self.checkpoint_every), "checkpoint_every")

    @property
    def collective_timeout_seconds(self) -> float:
        return parse_duration(str(self.collective_timeout), "collective_timeout")


@dataclass
class DampingOptions(Group):
    key = "damping"
    damping: Optional[float] = option(
        None, "Damping λ, the same for every layer (default: --damping-scale × mean(Λ) per layer).", positive=True)
    damping_scale: Optional[float] = option(
        None, f"Damping as a multiple of each layer's mean eigenvalue (default {DEFAULT_DAMPING_SCALE}; see "
        "docs/benchmarks.md).", positive=True)

    def check(self, options: "StageOptions") -> None:
        if self.damping is not None and self.damping_scale is not None:
            raise InputError(f"give either {flag('damping')} (absolute) or {flag('damping_scale')} (relative), "
                             "not both")

    @property
    def scale(self) -> float:
        return DEFAULT_DAMPING_SCALE if self.damping_scale is None else self.damping_scale


@dataclass
class SolveOptions(Group):
    key = "solve"
    solver: Optional[str] = option(
        None, "ekfac: H⁻¹∇L_q from the fitted curvature (default); cg: refined by --solve-iterations steps of "
        "conjugate gradients on the damped Gauss-Newton system of all tracked layers, preconditioned by it "
        "(README: when to use it).", choices=SOLVERS)
    solve_iterations: Optional[int] = option(
        None, f"--solver cg: CG iterations per batch of queries (default {DEFAULT_SOLVE_ITERATIONS}; 0 = EK-FAC "
        "exactly); each costs a pass over the solve sample.", minimum=0)
    solve_tokens: Optional[int] = option(
        None, "--solver cg: tokens of the Gauss-Newton sample, the first ones of --solve-corpus in file order "
        f"(default {DEFAULT_SOLVE_TOKENS}).", minimum=2)
    solve_corpus: Optional[str] = option(
        None, "--solver cg: corpus of the Gauss-Newton sample (default: the corpus the factors were fitted on, as "
        "their manifest records it, else --corpus; read with the fit's options and chunking).")

    def check(self, options: "StageOptions") -> None:
        if self.name != "cg":
            given = [flag(name) for name in ("solve_iterations", "solve_tokens", "solve_corpus")
                     if getattr(self, name) is not None]
            if given:
                raise InputError(f"{', '.join(given)} applies to {flag('solver', 'cg')} only")

    @property
    def name(self) -> str:
        return self.solver or "ekfac"

    @property
    def iterations(self) -> int:
        if self.solve_iterations is not None:
            return self.solve_iterations
        return DEFAULT_SOLVE_ITERATIONS if self.name == "cg" else 0

    @property
    def tokens(self) -> int:
        return DEFAULT_SOLVE_TOKENS if self.solve_tokens is None else self.solve_tokens


@dataclass
class QueryGradientOptions(Group):
    key = "gradients"
    query_rank: Optional[int] = option(None, "Rank of each preconditioned query gradient (0 = full; default "
                                       f"{DEFAULT_QUERY_RANK}).", minimum=0)

    @property
    def rank(self) -> int:
        return DEFAULT_QUERY_RANK if self.query_rank is None else self.query_rank


@dataclass
class ScoreOptions(Group):
    key = "scores"
    query_gradients_dir: Optional[str] = option(
        None, "Output of `attrib query-gradients` (default: computed into OUT/query-gradients).",
        flags=("--query-gradients",), stage_input=True)
    candidates: Optional[str] = option(None, "Output of `attrib prefilter`: score only these candidates.",
                                       stage_input=True)
    index: Optional[str] = option(
        None, "Output of `attrib index`: score every indexed sequence from its compressed gradient (no --corpus or "
        "--factors: the index's are used).", stage_input=True)
    prefilter: Optional[int] = option(None, "Run the TF-IDF prefilter first and keep this many candidates per query.",
                                      minimum=1)
    token_scores_top: Union[int, str] = option(
        "100", "Store per-token scores for the top K documents (per query; self-influence: sequences), 'all' or "
        "'none'.")
    keep_all_scores: bool = option(
        False, "Without candidates, keep every (query, document) score in documents.parquet (default: each query's "
        "1,000 most positive and 1,000 most negative, plus summary.parquet).")
    queries_per_pass: int = option(0, "Queries scored per pass over the corpus (0: as many as --max-memory allows; "
                                   "more passes cost more time, not memory).", minimum=0)

    def check(self, options: "StageOptions") -> None:
        if self.candidates is not None and self.prefilter is not None:
            raise InputError(f"give either {flag('candidates')} or {flag('prefilter')}, not both")
        if self.keep_all_scores and (self.candidates is not None or self.prefilter is not None):
            ignored(flag("keep_all_scores"), flag("candidates" if self.candidates is not None else "prefilter"),
                    "which keeps every candidate's score")
        if self.query_gradients_dir is not None and options.solve.solve_corpus is not None:
            ignored(flag("solve_corpus"), flag("query_gradients_dir"), "whose gradients are solved already")
        token_scores_count(self.token_scores_top)  # a bad value fails before any work

    @property
    def token_scores(self) -> int:
        """How many documents keep token scores: a positive number, -1 for 'all', 0 for 'none'."""
        return token_scores_count(self.token_scores_top)


def token_scores_count(value) -> int:
    text = str(value)
    if text in ("all", "none"):
        return -1 if text == "all" else 0
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise InputError(f"{flag('token_scores_top', value)} must be a positive number, 'all' or 'none'")


@dataclass
class PrefilterOptions(Group):
    key = "prefilter"
    top_k: int = option(10_000, "Candidates kept per query.", minimum=1)
    unit: str = option("document", "Rank whole documents, or the model's sequences (needs --model).",
                       choices=("document", "sequence"))
    analyzer: str = option("word", "word: lower-cased word n-grams; model: the --model tokenizer's tokens.",
                           choices=("word", "model"))
    ngram_range: Union[str, tuple] = option("1,1", "Smallest and largest n of the n-grams, e.g. 1,2.")
    scoring: str = option("tfidf", "tfidf (cosine, sublinear tf, smooth idf) or bm25 (k1=1.5, b=0.75).",
                          choices=("tfidf", "bm25"))
    query_text: str = option("both", "Which part of each query is searched: prompt, completion or both.",
                             choices=("prompt", "completion", "both"))
    backend: str = option("auto", "exact (in memory, TfidfVectorizer), streaming (two passes, flat memory) or auto.",
                          choices=("auto", "exact", "streaming"))
    model: Optional[str] = option(None, "Model whose tokenizer cuts sequences / reads text (with --index: whose query "
                                  "gradients are scored).", flags=("--model", "-m"))
    index: Optional[str] = option(
        None, "Output of `attrib index`: the candidates are each query's top K by index scores (needs --model; no "
        "--corpus).", stage_input=True)
    hash_features: Optional[int] = option(
        None, f"Hashed feature space of the streaming backend (default {DEFAULT_HASH_FEATURES}).", minimum=2**10)

    def check(self, options: "StageOptions") -> None:
        low, high = self.ngrams
        if not 1 <= low <= high:
            raise InputError(f"{flag('ngram_range', self.ngram_range)} needs 1 <= MIN <= MAX")
        if self.hash_features is not None and self.backend == "exact":
            ignored(flag("hash_features"), flag("backend", "exact"), "which counts every term exactly")
        if options.batch.max_length is not None and self.unit != "sequence" and self.index is None:
            ignored(flag("max_length"), flag("unit", self.unit), "which ranks whole documents")
        if self.model is None and (self.unit == "sequence" or self.analyzer == "model"):
            needs = flag("unit", "sequence") if self.unit == "sequence" else flag("analyzer", "model")
            raise InputError(f"{needs} needs {flag('model')} (its tokenizer cuts and reads the text)")

    @property
    def ngrams(self) -> tuple[int, int]:
        value = self.ngram_range
        parts = value.split(",") if isinstance(value, str) else list(value)
        try:
            low, high = (int(part) for part in parts)
        except (TypeError, ValueError):
            raise InputError(f"{flag('ngram_range', value)} must be two integers like 1,2") from None
        return low, high


@dataclass
class IndexOptions(Group):
    key = "index"
    representation: str = option(
        "kronecker", "kronecker: a --dims projection P_Sᵀ G P_A of each sequence's gradient (small, cheap to build and "
        "score at any width); lowrank: --rank factors of its whitened gradient (eigenbasis, ÷√(Λ+λ); best per byte "
        "on narrow models, d_out + d_in values per rank and layer).", choices=("kronecker", "lowrank"))
    rank: int = option(8, "lowrank: factors kept per sequence and layer (0 = full rank, exact).", minimum=0)
    dims: Optional[str] = option(
        None, f"kronecker: k_out x k_in kept per layer, e.g. 64 or 64x32; 0 = the layer's width (default "
        f"{DEFAULT_INDEX_DIMS}, or the layer's width where smaller).")
    projection: str = option("auto", "kronecker: eigen (top eigenvectors of S and A; finds far more of the top "
                             "documents), random (seeded Gaussian), or auto: eigen when the factors have eigenbases.",
                             choices=("auto", "eigen", "random"))
    seed: int = option(0, "Seed of the random projection.")
    storage_dtype: str = option("bfloat16", "Stored values: bfloat16, float16, float32 or float64 (scores accumulate "
                                "in float32).", choices=("bfloat16", "float16", "float32", "float64"))

    def check(self, options: "StageOptions") -> None:
        if self.dims is not None:
            parse_dims(self.dims)


@dataclass
class CombineOptions(Group):
    key = "combine"
    weights: str = option(
        "equal", "equal (their mean), lr (each checkpoint's learning rate from the trainer_state.json of the model "
        "directory it was scored with; TracIn) or one number per SCORES_DIR, e.g. 3e-4,1e-4; normalised to sum 1 "
        "(in Python also a list of numbers).")

    def check(self, options: "StageOptions") -> None:
        parse_weights(self.weights)


WEIGHTINGS = ("equal", "lr")


def parse_weights(weights) -> Union[str, list[float]]:
    """`--weights`: "equal", "lr", or the numbers of a comma-separated list (or of a sequence)."""
    if not isinstance(weights, str):
        try:
            return [float(w) for w in weights]
        except (TypeError, ValueError):
            raise InputError(f"{flag('weights')} takes equal, lr or numbers; {weights!r} is none of them") from None
    if weights in WEIGHTINGS:
        return weights
    try:
        return [float(w) for w in weights.split(",")]
    except ValueError:
        raise InputError(f"{flag('weights', weights)} is not equal, lr or a comma-separated list of numbers") from None


# --------------------------------------------------------------------------- what each stage offers


@dataclass(frozen=True)
class Input:
    """A positional input of a stage's API function (`attrib.query(model, factors, …)`), a flag on the
    command line. kind: model (a path, a hub id or a loaded model), rows (a path, a Dataset or dicts),
    stage (a stage directory or its StageResult), stages (one or more of them: the command's positional
    arguments) or out (the output directory)."""

    name: str
    help: str
    kind: str
    flags: tuple[str, ...] = ()
    required: bool = True


MODEL = Input("model", "Hugging Face causal LM: a local directory or a hub id.", "model", ("--model", "-m"))
FACTORS = Input("factors", "Output directory of `attrib fit-factors`.", "stage")
CORPUS = Input("corpus", "JSONL/Parquet/CSV/text file, a directory or glob of them, or a `datasets` hub name.", "rows")
QUERIES = Input("queries", 'JSONL of queries {"id", "prompt", "completion"} or {"id", "messages"}.', "rows")
OUT = Input("out", "Output stage directory (rerun to resume).", "out", ("--out", "-o"))
SCORES = Input("scores", "Output directories of `attrib query` at different checkpoints (same queries, candidates, "
               "corpus and chunking; run query with --keep-all-scores or --candidates).", "stages")


@dataclass(frozen=True)
class StageSpec:
    """A stage: its command, API function, inputs and option groups (`omit`: options of those groups it
    does not take). Its module `attrib.stages.<module>` has `run(*inputs, options, tokenizer)`."""

    command: str
    module: str
    summary: str
    example: str
    inputs: tuple[Input, ...]
    groups: tuple[type, ...]
    omit: frozenset[str] = frozenset()

    @property
    def function(self) -> str:
        return self.command.replace("-", "_")

    def option_fields(self) -> list[tuple[type, object]]:
        """(group, field) of every option the stage takes, in the order of its groups."""
        return [(group, item) for group in self.groups for item in fields(group) if item.name not in self.omit]

    def parse(self, given: dict) -> "StageOptions":
        """The options from keywords (unknown ones refused as Python refuses them), each one checked."""
        owners = {item.name: group for group, item in self.option_fields()}
        values: dict[type, dict] = {group: {} for group in self.groups}
        for name, value in given.items():
            if name not in owners:
                raise TypeError(f"{self.function}() got an unexpected keyword argument {name!r}")
            values[owners[name]][name] = value
        options = StageOptions(self, {group.key: group(**values[group]) for group in self.groups})
        offered = set(owners)
        for group in options.groups.values():
            group.check_fields(offered)
        for group in options.groups.values():
            group.check(options)
        return options


class StageOptions:
    """One stage's options by concern: `options.corpus.text_field`, `options.fit.strategy`."""

    def __init__(self, spec: StageSpec, groups: dict[str, Group]):
        self.spec = spec
        self.groups = groups

    def __getattr__(self, key: str) -> Group:
        try:
            return self.__dict__["groups"][key]
        except KeyError:
            raise AttributeError(key) from None

    def get(self, group: type) -> Group:
        """The stage's options of `group`, or that group's defaults where the stage does not take it."""
        return self.groups.get(group.key) or group()


CORPUS_READING = (CorpusOptions, BatchOptions)
CORPUS_ONLY = frozenset(CorpusOptions.__dataclass_fields__) - {"chat_template"}  # query-gradients reads no corpus
QUERIES_OR_GRADIENTS = replace(QUERIES, required=False, help=QUERIES.help[:-1] + " (not needed with --query-gradients).")
UNLESS_INDEX = " (not needed with --index)."
STAGES = {
    spec.command: spec
    for spec in (
        StageSpec("fit-factors", "fit", "Fit EK-FAC factors (covariances, eigenbases, eigenvalue correction).",
                  "attrib fit-factors --model M --corpus C --out run/factors",
                  (MODEL, CORPUS, OUT), (FitOptions, *CORPUS_READING, FitModelOptions, RunOptions)),
        StageSpec("prefilter", "prefilter", "Narrow a corpus to the documents a TF-IDF search finds for each query.",
                  "attrib prefilter --corpus C --queries Q --top-k 10000 --out run/candidates",
                  (replace(CORPUS, required=False, help=CORPUS.help[:-1] + UNLESS_INDEX), QUERIES, OUT),
                  (PrefilterOptions, *CORPUS_READING, ModelOptions, RunOptions),
                  frozenset({"loss_on", "tokens_per_batch", "docs_per_part", "dtype", "device", "max_memory"})),
        StageSpec("query-gradients", "query_gradients", "Compute, precondition and compress each query's gradient.",
                  "attrib query-gradients --model M --factors run/factors --queries Q --out run/query",
                  (MODEL, FACTORS, QUERIES, OUT),
                  (QueryGradientOptions, DampingOptions, SolveOptions, *CORPUS_READING, ModelOptions, RunOptions),
                  CORPUS_ONLY | {"docs_per_part"}),
        StageSpec("query", "query", "Score training sequences against every query: per document, per layer and per "
                  "token.", "attrib query --model M --factors run/factors --queries Q --corpus C --out run/scores",
                  (MODEL, replace(FACTORS, required=False, help=FACTORS.help[:-1] + UNLESS_INDEX), QUERIES_OR_GRADIENTS,
                   replace(CORPUS, required=False, help=CORPUS.help[:-1] + UNLESS_INDEX), OUT),
                  (ScoreOptions, QueryGradientOptions, DampingOptions, SolveOptions, *CORPUS_READING, ModelOptions,
                   RunOptions)),
        StageSpec("self-influence", "self_influence", "Score every training sequence by its self-influence (high: "
                  "surprising, corrupted or memorised).",
                  "attrib self-influence --model M --factors run/factors --corpus C --out run/self",
                  (MODEL, FACTORS, CORPUS, OUT), (ScoreOptions, DampingOptions, *CORPUS_READING, ModelOptions, RunOptions),
                  frozenset({"query_gradients_dir", "candidates", "index", "prefilter", "keep_all_scores",
                             "queries_per_pass"})),
        StageSpec("index", "index", "Index the corpus: one pass storing each sequence's compressed gradient, for "
                  "`attrib query --index` and `attrib prefilter --index`.",
                  "attrib index --model M --factors run/factors --corpus C --out run/index",
                  (MODEL, FACTORS, CORPUS, OUT),
                  (IndexOptions, DampingOptions, *CORPUS_READING, ModelOptions, RunOptions), frozenset({"max_memory"})),
        StageSpec("combine", "combine", "Combine the scores of several checkpoints into one scores directory (a "
                  "weighted sum; ranks recomputed).", "attrib combine run/ckpt-*/scores --out run/scores-combined",
                  (SCORES, OUT), (CombineOptions, RunOptions), frozenset({"max_memory"})),
    )
}


@functools.cache
def cli_flag(name: str) -> str:
    """The command-line flag of an option or input (`query_gradients_dir` is `--query-gradients`)."""
    declared = [item.metadata["flags"] for group in Group.__subclasses__() for item in fields(group)
                if item.name == name] + [i.flags for i in (MODEL, FACTORS, CORPUS, QUERIES, OUT) if i.name == name]
    for flags in declared:
        for text in flags:
            if text.startswith("--") and "/" not in text:
                return text
    return "--" + name.replace("_", "-")


def default_of(group: type, name: str):
    """An option's default (for commands that show it, e.g. `attrib inspect`)."""
    item = group.__dataclass_fields__[name]
    return None if item.default is MISSING else item.default


def help_of(group: type, name: str) -> str:
    return group.__dataclass_fields__[name].metadata["help"]


def ignored(option: str, under: str, why: str) -> None:
    """Refuse an option that would have no effect under another one (a user who gave it expects one)."""
    raise InputError(f"{option} has no effect with {under}, {why}; drop it")


def parse_dims(text: str) -> list[int]:
    """`"16"` -> [16, 16], `"8x32"` -> [8, 32] (k_out × k_in); 0 means the layer's full width."""
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"{flag('dims', text)} must look like 16 or 16x32 (k_out x k_in per layer)")
    values = [int(p) for p in parts]
    return values * 2 if len(values) == 1 else values


def parse_duration(text: str, name: str) -> float:
    """Seconds from '90', '90s', '10m' or '2h' (0 is allowed)."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise InputError(f"{flag(name, text)} is not a duration like 90s, 10m or 2h") from None
    if seconds < 0:
        raise InputError(f"{flag(name)} must not be negative")
    return seconds
