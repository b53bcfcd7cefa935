"""Predicted peak memory of each stage, from shapes alone (docs/design.md §3: a stage's peak is
what `attrib inspect` predicts).

Nothing here loads weights or imports torch: a stage is described by a `ModelShape` (read
from a config), the tracked layers' `(name, d_in_folded, d_out)` and its settings, and each
function returns a `StagePeak`: the device and host peaks, and the named terms of the device
peak so a user sees what dominates. A new stage adds one function that builds its terms with
the helpers below (`model_terms`, `activation_bytes`, `logit_bytes`) and registers it in STAGES.

The per-token activation coefficients were measured on CPU (torch 2.13, transformers 5,
sdpa attention) with Llama and GPT-2 blocks of several widths (docs/benchmarks.md,
"Memory model"), then rounded up; they are upper bounds, not fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from attrib.options import DEFAULT_INDEX_DIMS, DEFAULT_QUERY_RANK
from attrib.strategies import STRATEGY

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
GiB = 2**30

# Saved-for-backward activations per token and block, in elements of the model dtype:
# ACT_HIDDEN × hidden + ACT_INTERMEDIATE × intermediate (frozen weights: linear layers keep
# no inputs for weight gradients). Measured ≈ 11.7 h + 3.6 i; rounded up.
ACT_HIDDEN = 14
ACT_INTERMEDIATE = 5
# A process that has imported torch and transformers and run a first batch (allocator
# pools, kernels' workspaces): measured 0.55–0.8 GiB on CPU; CUDA adds its host context.
PROCESS_HOST = {"cpu": int(1.0 * GiB), "cuda": int(3.0 * GiB)}
# Device workspace beyond the named terms (allocator fragmentation, kernel workspaces).
DEVICE_SLACK = 0.10
NLL_CHUNK = 2048  # rows of the float32 log-softmax chunks in capture.label_nll
SAMPLE_CHUNK = 256  # rows of Gumbel noise in capture.sample_labels
CORRECTION_STEP_ELEMENTS = 2**24  # factors.STEP_ELEMENTS
# --solver cg: dense all-layer vectors per query (b, x, r, z, p, A p and the G p being summed, one
# spare for a temporary), and float32 [Q, tokens, vocab] tensors of one Gauss-Newton pass (J v,
# softmax, H J v, the cotangent in the model dtype)
CG_VECTORS = 8
GN_LOGIT_COPIES = 4
DENSE_BYTES = 2**28  # the most memory scoring gives the queries' dense P_q, all layers together
# index scoring (attrib.stages.index): a block of sequences read and formed at once per layer (W_n = L Rᵀ for
# lowrank), the query sides of a pass, and the float64 layer scores of a group of a shard's sequences
SCORE_BLOCK_ELEMENTS = 2**24
PASS_BYTES = 2**30
SCORES_BYTES = 2**28


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a causal LM depends on, read from its config."""

    parameters: int
    hidden: int
    intermediate: int
    blocks: int
    vocab: int

    @classmethod
    def from_config(cls, config, parameters: int) -> ModelShape:
        def first(*names, default=0):
            for name in names:
                value = getattr(config, name, None)
                if value:
                    return int(value)
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        return cls(
            parameters=parameters,
            hidden=hidden,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            blocks=first("num_hidden_layers", "n_layer"),
            vocab=first("vocab_size"),
        )


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_in: int  # bias folded in
    d_out: int


@dataclass
class StagePeak:
    """Predicted peak bytes; `terms` name the parts of the device peak (of `step`, the step that peaks)."""

    device: int
    host: int
    step: str
    terms: dict[str, int] = field(default_factory=dict)
    steps: dict[str, dict[str, int]] = field(default_factory=dict)  # every step's terms


def parse_bytes(text: str, option: str) -> int:
    """Bytes from '80GiB', '80G', '512MiB', '40GB' (GB = 10⁹, G and GiB = 2³⁰)."""
    import re

    from attrib.errors import InputError

    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise InputError(f"{option} {text!r} is not a size like 80GiB or 512MiB")
    number, prefix, suffix = match.groups()
    power = " kmgt".index(prefix) if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024
    try:
        return int(float(number) * base**power)
    except ValueError:
        raise InputError(f"{option} {text!r} is not a size like 80GiB or 512MiB") from None


def layer_shapes(layers) -> list[LayerShape]:
    """LayerShapes of attrib.models.TrackedLayer objects."""
    return [LayerShape(layer.name, layer.d_in_folded, layer.d_out) for layer in layers]


def model_shape(model) -> ModelShape:
    """The ModelShape of a loaded (or meta-device) model."""
    return ModelShape.from_config(model.config, sum(p.numel() for p in model.parameters()))


def model_terms(model: ModelShape, dtype: str) -> int:
    return model.parameters * DTYPE_BYTES[dtype]


def activation_bytes(model: ModelShape, tokens: int, dtype: str) -> int:
    """Activations a forward keeps for the input-only backward of `tokens` padded tokens."""
    per_token = (ACT_HIDDEN * model.hidden + ACT_INTERMEDIATE * model.intermediate) * model.blocks
    return tokens * per_token * DTYPE_BYTES[dtype]


def logit_bytes(model: ModelShape, tokens: int, dtype: str, sampled: bool) -> int:
    """Logits and their gradient in the model dtype, plus the float32 chunks of the NLL and sampling."""
    size = DTYPE_BYTES[dtype]
    chunks = 3 * min(tokens, NLL_CHUNK) * model.vocab * 4
    if sampled:
        chunks = max(chunks, 2 * SAMPLE_CHUNK * model.vocab * 4)
    return 2 * tokens * model.vocab * size + chunks


def layer_groups(count: int, layers_per_pass: int | None) -> list[list[int]]:
    """The same consecutive groups as attrib.stages.fit.layer_groups."""
    size = count if layers_per_pass is None else max(1, min(layers_per_pass, count))
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def fit_factors(
    model: ModelShape,
    layers: list[LayerShape],
    *,
    tokens_per_batch: int,
    dtype: str,
    device: str = "cpu",
    layers_per_pass: int | None = None,
    strategy: str = "ekfac",
    fisher: str = "empirical",
    stats_dtype: str = "float32",
) -> StagePeak:
    """Peak of `attrib fit-factors`: the largest of its steps (covariance pass, one-layer
    eigendecomposition, correction pass) for the largest layer group."""
    stats = DTYPE_BYTES[stats_dtype]
    weights = model_terms(model, dtype)
    forward = activation_bytes(model, tokens_per_batch, dtype) + logit_bytes(
        model, tokens_per_batch, dtype, sampled=fisher == "true"
    )
    steps: dict[str, dict[str, int]] = {}
    groups = [[layers[i] for i in group] for group in layer_groups(len(layers), layers_per_pass)]
    kind = STRATEGY[strategy]
    if kind.covariances:
        steps["covariance"] = max(
            (
                {
                    "weights": weights,
                    "activations": forward,
                    "covariance sums": sum(l.d_in**2 + l.d_out**2 for l in group) * stats,
                    # a or g of one layer converted to the statistics dtype
                    "statistics transient": tokens_per_batch * max(max(l.d_in, l.d_out) for l in group) * stats,
                }
                for group in groups
            ),
            key=lambda terms: sum(terms.values()),
        )
        widest = max(max(l.d_in, l.d_out) for l in layers)
        smaller = max(min(l.d_in, l.d_out) for l in layers)
        steps["eigendecomposition"] = {
            "weights": weights,
            # float32 covariance + float64 copy, its transpose, eigenvectors and workspace,
            # beside the other side's float32 result
            "eigendecomposition": widest**2 * (4 + 4 * 8) + smaller**2 * 4,
        }
    if kind.corrects:
        rotates = kind.rotates

        def correction(group):
            per_step = max(
                min(8, max(1, CORRECTION_STEP_ELEMENTS // (l.d_in * l.d_out))) * l.d_in * l.d_out for l in group
            )
            return {
                "weights": weights,
                "activations": forward,
                "eigenvectors": sum(l.d_in**2 + l.d_out**2 for l in group) * stats if rotates else 0,
                "lambda sums": sum(l.d_in * l.d_out for l in group) * stats,
                # every layer keeps its (rotated) input until backward
                "kept inputs": sum(l.d_in for l in group) * tokens_per_batch * stats,
                # per-sequence gradients, their rotations and squares; rotated g
                "correction transient": 4 * per_step * stats + tokens_per_batch * max(l.d_out for l in group) * stats,
            }

        steps["correction"] = max((correction(g) for g in groups), key=lambda terms: sum(terms.values()))
    if not steps:  # identity: nothing is fitted
        steps["none"] = {"weights": weights}
    return _peak(steps, device, weights, largest_tensor=max((max(l.d_in, l.d_out) ** 2 for l in layers), default=0) * 4)


def step_device_bytes(terms: dict[str, int]) -> int:
    """A step's device peak: its named terms plus DEVICE_SLACK."""
    return int(sum(terms.values()) * (1 + DEVICE_SLACK))


def _peak(steps: dict[str, dict[str, int]], device: str, weights: int, largest_tensor: int) -> StagePeak:
    """The stage's peak over its steps. On CPU the host holds everything plus the process; on a
    GPU the host holds the process, the weights while loading, and one float32 tensor per write."""
    step, terms = max(steps.items(), key=lambda item: step_device_bytes(item[1]))
    device_peak = step_device_bytes(terms)
    if device == "cpu":
        return StagePeak(device_peak, device_peak + PROCESS_HOST["cpu"], step, terms, steps)
    return StagePeak(device_peak, PROCESS_HOST["cuda"] + weights + largest_tensor, step, terms, steps)


def choose_layers_per_pass(budget: int, predict: Callable[[int | None], StagePeak], layers: int, device: str) -> int | None:
    """The fewest passes (largest group) whose predicted peak fits `budget` bytes: None when
    all layers fit in one pass; raises ValueError when not even one layer per pass fits."""

    def peak(n):
        result = predict(n)
        return result.host if device == "cpu" else result.device

    if peak(None) <= budget:
        return None
    for n in range(layers - 1, 0, -1):
        if peak(n) <= budget:
            return n
    raise ValueError(f"one layer per pass needs {peak(1) / GiB:.1f} GiB")


def query_factor_bytes(layers: list[LayerShape], rank: int) -> int:
    """Bytes of one query's float32 factors over all layers (U, σ, V) at `rank` (0 = full)."""
    total = 0
    for l in layers:
        r = min(l.d_out, l.d_in) if rank == 0 else min(rank, l.d_out, l.d_in)
        total += r * (l.d_out + l.d_in + 1)
    return total * 4


def query_gradients(model: ModelShape, layers: list[LayerShape], *, tokens_per_batch: int, dtype: str,
                    device: str = "cpu", rank: int = DEFAULT_QUERY_RANK, queries_per_batch: int = 1, max_length: int = 512,
                    rotates: bool = True, cg: bool = False) -> StagePeak:
    """Peak of `attrib query-gradients`: one batch of queries forward and backward, and inside the
    backward one layer at a time its dense gradients, their preconditioning with that layer's
    curvature (read just then) and the compression.

    With `cg` (`--solver cg` with iterations) the dense gradients of every layer are kept for the
    solve: CG_VECTORS float32 copies of them, beside one Gauss-Newton pass over a sample batch of
    about tokens_per_batch / Q tokens for Q stacked directions (attrib.solve): the primal activations
    of that batch, and Q tangents of activations and logits (an estimate, not yet measured)."""
    tokens = min(tokens_per_batch, queries_per_batch * max_length)
    weights = model_terms(model, dtype)
    widest = max(l.d_in * l.d_out for l in layers)
    if cg:
        every_layer = sum(l.d_in * l.d_out for l in layers)
        stacked = max(tokens_per_batch, max_length)  # Q directions × the sample batch's tokens
        terms = {
            "weights": weights,
            "cg vectors": CG_VECTORS * queries_per_batch * every_layer * 4,
            # the vjp's saved activations and the Q tangents of the jvp, each at most `stacked` tokens
            "gauss-newton pass": 2 * activation_bytes(model, stacked, dtype)
            + GN_LOGIT_COPIES * stacked * model.vocab * 4,
            "layer curvature": max(l.d_in * l.d_out + (l.d_in**2 + l.d_out**2 if rotates else 0) for l in layers) * 4,
            "batch factors": queries_per_batch * query_factor_bytes(layers, rank),
        }
        return _peak({"query gradients": terms}, device, weights, largest_tensor=widest * 4)
    terms = {
        "weights": weights,
        "activations": activation_bytes(model, tokens, dtype) + logit_bytes(model, tokens, dtype, sampled=False),
        "kept inputs": sum(l.d_in for l in layers) * tokens * 4,
        # the batch's dense gradients of one layer, their rotation and the preconditioned result
        "dense query gradients": 3 * queries_per_batch * widest * 4,
        "layer curvature": max(l.d_in * l.d_out + (l.d_in**2 + l.d_out**2 if rotates else 0) for l in layers) * 4,
        "batch factors": queries_per_batch * query_factor_bytes(layers, rank),
    }
    return _peak({"query gradients": terms}, device, weights, largest_tensor=widest * 4)


def query(model: ModelShape, layers: list[LayerShape], *, tokens_per_batch: int, dtype: str, device: str = "cpu",
          rank: int = DEFAULT_QUERY_RANK, queries_per_pass: int = 1, docs_per_part: int = 2000, max_length: int = 512,
          token_scores: bool = True) -> StagePeak:
    """Peak of `attrib query`: one pass of queries' factors on the device, a batch of training
    sequences forward and backward with the kept projections, and the token scores of a part."""
    weights = model_terms(model, dtype)
    width = queries_per_pass * rank if rank else queries_per_pass * max(min(l.d_in, l.d_out) for l in layers)
    terms = {
        "weights": weights,
        "activations": activation_bytes(model, tokens_per_batch, dtype)
        + logit_bytes(model, tokens_per_batch, dtype, sampled=False),
        "kept projections": sum(min(l.d_in, width) for l in layers) * tokens_per_batch * 4,
        # the stacked factors on the device beside the host copy they were read into
        "query factors": 2 * queries_per_pass * query_factor_bytes(layers, rank),
        "token scores": 2 * tokens_per_batch * queries_per_pass * 4
        + (docs_per_part * max_length * queries_per_pass * 4 if token_scores else 0),
        "dense query gradients": dense_query_bytes(layers, queries_per_pass),
    }
    return _peak({"scoring": terms}, device, weights, largest_tensor=max(l.d_in * l.d_out for l in layers) * 4)


def dense_query_bytes(layers: list[LayerShape], queries: int) -> int:
    """The float32 dense P_q [Q, d_out·d_in] that scoring keeps for ⟨P_q, G_n⟩: every layer's, in order, while
    their total fits DENSE_BYTES (attrib.scoring.Scorer)."""
    total = 0
    for l in layers:
        size = queries * l.d_in * l.d_out * 4
        if total + size > DENSE_BYTES:
            break
        total += size
    return total


def self_influence_factor_bytes(layers: list[LayerShape], rotates: bool = True) -> int:
    """Bytes of every layer's float32 curvature on the device: Λ and, when the strategy rotates, Q_A and Q_S."""
    return sum(l.d_in * l.d_out + (l.d_in**2 + l.d_out**2 if rotates else 0) for l in layers) * 4


def self_influence(model: ModelShape, layers: list[LayerShape], *, tokens_per_batch: int, dtype: str,
                   device: str = "cpu", rotates: bool = True, resident_factors: bool = True) -> StagePeak:
    """Peak of `attrib self-influence`: a batch of training sequences forward and backward with every
    layer's inputs kept; inside one layer's backward its rotated inputs and output gradients and the
    dense per-sequence gradients of at most `correction_sequences_per_step` sequences (G, G ⊘ (Λ + λ)
    and their product); the curvature of every layer on the device (`resident_factors`) or of one."""
    weights = model_terms(model, dtype)
    widest = max(l.d_in * l.d_out for l in layers)
    step = max(1, min(8, CORRECTION_STEP_ELEMENTS // widest))
    curvature = [self_influence_factor_bytes([l], rotates) for l in layers]
    terms = {
        "weights": weights,
        "activations": activation_bytes(model, tokens_per_batch, dtype)
        + logit_bytes(model, tokens_per_batch, dtype, sampled=False),
        "kept inputs": sum(l.d_in for l in layers) * tokens_per_batch * 4,
        "rotated inputs and gradients": max(l.d_in + l.d_out for l in layers) * tokens_per_batch * 4,
        "per-sequence gradients": 3 * step * widest * 4,
        "curvature": sum(curvature) if resident_factors else max(curvature),
    }
    return _peak({"self-influence": terms}, device, weights, largest_tensor=widest * 4)


def index_shape(layer: LayerShape, representation: str, rank: int, dims) -> dict[str, list[int]]:
    """The stored tensors of one sequence and layer of an index, by name suffix (0: full rank or width; dims None:
    DEFAULT_INDEX_DIMS per side, or the layer's width where smaller)."""
    if representation == "lowrank":
        rank = rank or min(layer.d_out, layer.d_in)
        return {"left": [layer.d_out, rank], "right": [layer.d_in, rank]}
    if dims is None:
        return {"projected": [min(DEFAULT_INDEX_DIMS, layer.d_out), min(DEFAULT_INDEX_DIMS, layer.d_in)]}
    return {"projected": [dims[0] or layer.d_out, dims[1] or layer.d_in]}


def index_values(layers: list[LayerShape], representation: str, rank: int, dims) -> int:
    """Values stored per sequence over all layers (bytes: times the storage dtype's size)."""
    return sum(a * b for l in layers for a, b in index_shape(l, representation, rank, dims).values())


def index_query_side_bytes(layers: list[LayerShape], representation: str, rank: int, dims, query_rank: int,
                           itemsize: int = 4) -> int:
    """One query's side of index scoring (attrib.stages.index.QuerySide): every layer's rotated factors, one
    layer's unrotated ones while they are read, and every layer's formed T (kronecker) or the largest (lowrank)."""
    factors = formed = unrotated = 0
    for l in layers:
        r = min(query_rank or min(l.d_out, l.d_in), l.d_out, l.d_in)
        rows, columns = index_shape(l, "kronecker", 0, dims if representation == "kronecker" else [0, 0])["projected"]
        factors += r * (rows + columns)
        unrotated = max(unrotated, r * (l.d_out + l.d_in))
        formed = formed + rows * columns if representation == "kronecker" else max(formed, rows * columns)
    return (factors + unrotated + formed) * itemsize


def _projection_bytes(layers: list[LayerShape], dims) -> int:
    """Every layer's float32 kronecker projections P_S [d_out, k_out] and P_A [d_in, k_in]."""
    return sum(l.d_out * a + l.d_in * b for l in layers
               for a, b in [index_shape(l, "kronecker", 0, dims)["projected"]]) * 4


def index_queries_per_pass(layers: list[LayerShape], representation: str, rank: int, dims, query_rank: int,
                           queries: int, itemsize: int = 4) -> int:
    """Queries per pass of index scoring: as many as PASS_BYTES holds the query sides of (at least one)."""
    side = index_query_side_bytes(layers, representation, rank, dims, query_rank, itemsize)
    return max(1, min(queries, PASS_BYTES // side))


def index_build(model: ModelShape, layers: list[LayerShape], *, tokens_per_batch: int, dtype: str, device: str = "cpu",
                representation: str = "kronecker", rank: int = 8, dims=None, storage_dtype: str = "bfloat16",
                docs_per_part: int = 2000, rotates: bool = True, resident_factors: bool = True) -> StagePeak:
    """Peak of `attrib index`: a batch of training sequences forward and backward with every layer's inputs
    kept (kronecker: projected); inside one layer's backward (lowrank) its rotated inputs and output gradients
    and the dense whitened gradients of `correction_sequences_per_step` sequences with their SVD's workspace;
    the curvature of every layer (`resident_factors`) or of one; and on the host the part being built:
    about `docs_per_part` sequences' stored values."""
    weights = model_terms(model, dtype)
    widest = max(l.d_in * l.d_out for l in layers)
    step = max(1, min(8, CORRECTION_STEP_ELEMENTS // widest))
    lowrank = representation == "lowrank"
    kept = sum(l.d_in if lowrank else index_shape(l, representation, rank, dims)["projected"][1] for l in layers)
    curvature = [self_influence_factor_bytes([l], rotates) for l in layers]
    terms = {
        "weights": weights,
        "activations": activation_bytes(model, tokens_per_batch, dtype)
        + logit_bytes(model, tokens_per_batch, dtype, sampled=False),
        "kept inputs": kept * tokens_per_batch * 4,
    }
    if lowrank:
        terms["rotated inputs and gradients"] = max(l.d_in + l.d_out for l in layers) * tokens_per_batch * 4
        terms["per-sequence gradients"] = 3 * step * widest * 4  # G, its whitened copy, the SVD's workspace
        terms["curvature"] = sum(curvature) if resident_factors else max(curvature)
    else:
        terms["projections"] = _projection_bytes(layers, dims)
    part = docs_per_part * index_values(layers, representation, rank, dims) * DTYPE_BYTES[storage_dtype]
    peak = _peak({"index": terms}, device, weights, largest_tensor=widest * 4)
    peak.host += part
    peak.terms = {**peak.terms, "part being built (host)": part}
    return peak


def index_scoring(model: ModelShape, layers: list[LayerShape], *, dtype: str, device: str = "cpu",
                  representation: str = "kronecker", rank: int = 8, dims=None, query_rank: int = DEFAULT_QUERY_RANK,
                  queries: int = 16, queries_per_pass: int | None = None, documents_top: int = 1000,
                  docs_per_part: int = 2000, rotates: bool = True) -> StagePeak:
    """Peak of `attrib query --index` once its query gradients exist: the query sides of one pass, one layer's
    curvature (lowrank: its eigenbases while the factors are rotated, its Λ while T is formed) or every layer's
    projections (kronecker), a block of stored sequences formed per layer, a group's float64 layer scores, and
    each query's running tails (2 × documents_top documents × layers, float64: the output's size) with their
    merge's copies."""
    weights = model_terms(model, dtype)
    side = index_query_side_bytes(layers, representation, rank, dims, query_rank)
    per_pass = queries_per_pass or index_queries_per_pass(layers, representation, rank, dims, query_rank, queries)
    kept = 2 * documents_top if documents_top else 0
    widest = max(l.d_in * l.d_out if representation == "lowrank" else a * b
                 for l in layers for a, b in [index_shape(l, "kronecker", 0, dims)["projected"]])
    terms = {
        "weights": weights,
        "query sides": per_pass * side,
        "curvature": max(l.d_in * l.d_out + (l.d_in**2 + l.d_out**2 if rotates else 0) for l in layers) * 4
        if representation == "lowrank" else _projection_bytes(layers, dims),
        # a shard holds about docs_per_part sequences; a block (at least one sequence) is read in its storage
        # dtype and formed in float32
        "stored block": 2 * max(widest, min(SCORE_BLOCK_ELEMENTS, docs_per_part * widest)) * 4,
        "group scores": 2 * min(SCORES_BYTES, docs_per_part * per_pass * len(layers) * 8),
        # the tails, the candidates they are merged with (as many again) and the taken copy
        "tails": 3 * per_pass * kept * (len(layers) + 1) * 8,
    }
    return _peak({"index scores": terms}, device, weights, largest_tensor=max(l.d_in * l.d_out for l in layers) * 4)


def largest_fitting(predict: Callable[[int], StagePeak], budget: int, device: str, most: int) -> int:
    """The largest n in [1, most] whose predicted peak (device memory on a GPU, host on CPU) fits
    `budget`; 1 when none does (the stage then says what it needs)."""

    def fits(n: int) -> bool:
        peak = predict(n)
        return (peak.host if device == "cpu" else peak.device) <= budget

    low, high = 1, max(1, most)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def query_batching(model: ModelShape, layers: list[LayerShape], *, queries: int, budget: int, tokens_per_batch: int,
                   dtype: str, device: str, rank: int, max_length: int, rotates: bool = True,
                   docs_per_part: int = 2000, most_per_batch: int = 64, cg: bool = False) -> tuple[int, int]:
    """(queries per batch of query-gradients, queries per pass of query) whose predicted peaks fit `budget`."""
    kind = "cpu" if device == "cpu" else "cuda"
    per_batch = largest_fitting(
        lambda n: query_gradients(model, layers, tokens_per_batch=tokens_per_batch, dtype=dtype, device=kind,
                                  rank=rank, queries_per_batch=n, max_length=max_length, rotates=rotates, cg=cg),
        budget, kind, min(most_per_batch, queries))
    per_pass = largest_fitting(
        lambda n: query(model, layers, tokens_per_batch=tokens_per_batch, dtype=dtype, device=kind, rank=rank,
                        queries_per_pass=n, docs_per_part=docs_per_part, max_length=max_length),
        budget, kind, queries)
    return per_batch, per_pass


def default_budget(device: str) -> int:
    """Memory a query stage plans for without --max-memory: 90% of the GPU, or half of the host's RAM."""
    import os

    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.9)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


STAGES: dict[str, Callable[..., StagePeak]] = {
    "fit-factors": fit_factors, "query-gradients": query_gradients, "query": query, "self-influence": self_influence,
    "index": index_build, "index scores": index_scoring,
}
