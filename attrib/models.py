"""Load a Hugging Face causal LM, find the MLP layers to track, and fingerprint them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from attrib.errors import InputError
from attrib.options import DTYPES
from attrib.runtime import flag

# model_type -> regex over module names that selects the MLP projections of every block
# (module names checked against transformers' modeling files on tiny configs; tests/test_models.py).
GATED_MLP = r"\.mlp\.(gate_proj|up_proj|down_proj)$"
MLP_PATTERNS = {
    "gpt2": r"\.mlp\.(c_fc|c_proj)$",
    "gpt_bigcode": r"\.mlp\.(c_fc|c_proj)$",  # StarCoder (1); nn.Linear, not GPT-2's Conv1D
    "starcoder2": r"\.mlp\.(c_fc|c_proj)$",
    "gpt_neox": r"\.mlp\.(dense_h_to_4h|dense_4h_to_h)$",
    "falcon": r"\.mlp\.(dense_h_to_4h|dense_4h_to_h)$",
    "bloom": r"\.mlp\.(dense_h_to_4h|dense_4h_to_h)$",
    "gptj": r"\.mlp\.(fc_in|fc_out)$",
    "opt": r"\.(fc1|fc2)$",
    "phi": r"\.mlp\.(fc1|fc2)$",
    "phi3": r"\.mlp\.(gate_up_proj|down_proj)$",
    **{
        name: GATED_MLP
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                     "stablelm", "granite", "cohere")
    },
}
# Projections that read the same input tensor in every block (a gated MLP's gate and up): the
# fit accumulates and decomposes one A for both (Capture checks at run time that the input is shared).
SHARED_INPUT = ("gate_proj", "up_proj")
# Unknown model types: the Linear children of a module named mlp, feed_forward or ffn (said when used).
FALLBACK_PATTERN = r"(^|\.)(mlp|feed_forward|ffn)\.[^.]+$"
# Mixture-of-experts layers: expert modules see only the tokens routed to them, not [batch, seq, d].
EXPERTS = re.compile(r"(^|\.)(experts|block_sparse_moe)(\.|$)")


@dataclass
class TrackedLayer:
    """A linear map y = W a (+ b) whose weight the influence is computed for.

    `transposed` marks GPT-2's Conv1D, which stores W as (d_in, d_out).
    """

    name: str
    module: object
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool

    @property
    def d_in_folded(self) -> int:
        """Input width with the bias folded in as a column of ones (docs/design.md §2)."""
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.d_out * self.d_in_folded

    def weight_matrix(self):
        """W with the bias as an extra column, shape [d_out, d_in_folded], in the module's dtype."""
        import torch

        weight = self.module.weight.t() if self.transposed else self.module.weight
        if self.has_bias:
            weight = torch.cat([weight, self.module.bias[:, None]], dim=1)
        return weight


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{flag('device', device)} asked for, but no CUDA device is available; use {flag('device', 'cpu')}")
    return device


def looks_like_hub_id(spec: str) -> bool:
    """`name` or `org/name`, not a path that merely does not exist."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec) is not None and not spec.endswith((".json", ".jsonl"))


@contextlib.contextmanager
def _loading(spec: str, what: str = ""):
    """Turn a transformers loading failure into one line that says where attrib looked; transformers'
    own log lines and bars are off meanwhile (and restored after: the user's settings are theirs)."""
    from attrib.progress import libraries_quiet

    try:
        with libraries_quiet("transformers"):
            yield
    except (OSError, ValueError) as exc:
        where = "the directory" if Path(spec).expanduser().exists() else "the hub (is the network reachable?)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{flag('model', spec)}{what} could not be loaded from {where}: {first_line}") from exc


def model_source(spec: str, revision: str | None = None) -> str:
    """The directory or hub id to load `spec` from; a mistyped path is named plainly, not sent to the hub."""
    path = Path(spec).expanduser()
    if not path.exists() and not looks_like_hub_id(spec):
        raise InputError(f"{flag('model', spec)}: no such directory (and not a hub id)")
    if path.exists() and not (path / "config.json").is_file():
        raise InputError(f"{flag('model', spec)} has no config.json; give a directory saved with save_pretrained")
    if path.exists() and revision is not None:
        raise InputError(f"{flag('revision', revision)} selects a revision of a hub model, but {flag('model', spec)} "
                         "is a local directory (one revision already); drop --revision or give the hub id")
    return str(path) if path.exists() else spec


def model_label(spec: str, revision: str | None) -> str:
    """The model as manifests record it: the directory or hub id, with `@revision` where one was chosen."""
    return spec if revision is None else f"{spec}@{revision}"


def load_tokenizer(spec: str, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer and config of a model, without its weights (for stages that only tokenize)."""
    from transformers import AutoConfig, AutoTokenizer

    source = model_source(spec, revision)
    with _loading(model_label(spec, revision), " tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    return tokenizer, config


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """The model (in eval mode, weights frozen) and its tokenizer, from a directory or hub id (at `revision`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise InputError(f"{flag('dtype', dtype)} is not one of {', '.join(DTYPES)}")
    source = model_source(spec, revision)
    with _loading(model_label(spec, revision)):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, revision=revision
        )
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def find_tracked_layers(model, pattern: str | None = None) -> list[TrackedLayer]:
    """The linear layers to compute influence for: the MLP projections, or those `pattern` matches.

    Known model types use `MLP_PATTERNS`; others fall back to the Linear children of
    modules named mlp, feed_forward or ffn, and say so. Mixture-of-experts models are
    refused unless `pattern` leaves the experts out: an expert sees routed tokens.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    from attrib.progress import message

    model_type = getattr(model.config, "model_type", "?")
    routed = [name for name, _ in model.named_modules() if EXPERTS.search(name)]
    fallback = False
    if pattern is None:
        if routed:
            raise InputError(
                f"{model_type} is a mixture-of-experts model: its expert layers ({routed[0]}, …) see only the "
                f"tokens routed to them, which attrib cannot attribute; pass {flag('modules')} for layers outside "
                f"the experts (e.g. {flag('modules', 'self_attn[.]o_proj$')})"
            )
        fallback = model_type not in MLP_PATTERNS
        pattern = FALLBACK_PATTERN if fallback else MLP_PATTERNS[model_type]
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise InputError(f"{flag('modules', pattern)} is not a valid regular expression: {exc}") from exc
    layers = []
    for name, module in model.named_modules():
        if not regex.search(name):
            continue
        if isinstance(module, torch.nn.Linear):
            layers.append(
                TrackedLayer(name, module, module.in_features, module.out_features, module.bias is not None, False)
            )
        elif isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            layers.append(TrackedLayer(name, module, d_in, d_out, module.bias is not None, True))
    experts = [layer.name for layer in layers if EXPERTS.search(layer.name)]
    if experts:
        raise InputError(
            f"{flag('modules', pattern)} matches expert layers of a mixture-of-experts model ({experts[0]}, …), which "
            f"see only the tokens routed to them; leave them out of {flag('modules')}"
        )
    if not layers:
        if fallback:
            raise InputError(
                f"attrib does not know the MLP layers of model type '{model_type}' and found no Linear layer in a "
                f"module named mlp, feed_forward or ffn; pass {flag('modules')} (see `attrib inspect --modules '.*' "
                "--model M` for names) and please report the architecture"
            )
        raise InputError(
            f"{flag('modules', pattern)} matches no nn.Linear or Conv1D module of this {model_type} model"
        )
    if fallback:
        message(
            f"model type '{model_type}' is not in attrib's list: tracking the {len(layers)} Linear layers inside "
            "modules named mlp, feed_forward or ffn (structural fallback); check them with `attrib inspect` "
            f"or choose with {flag('modules')}"
        )
    return layers


def shared_activation_sources(layers: list[TrackedLayer], groups: list[list[int]]) -> dict[int, int]:
    """Layer index -> index of the layer whose activation covariance it shares (same block,
    `SHARED_INPUT` names, same group of a partitioned fit, same input width and bias)."""
    sources = {}
    for group in groups:
        by_parent: dict[str, int] = {}
        for i in group:
            parent, _, leaf = layers[i].name.rpartition(".")
            if leaf not in SHARED_INPUT:
                continue
            first = by_parent.setdefault(parent, i)
            if first != i and (layers[first].d_in, layers[first].has_bias) == (layers[i].d_in, layers[i].has_bias):
                sources[i] = first
    return sources


def fingerprint(model, layers: list[TrackedLayer]) -> str:
    """sha256 of the model's identity as far as influence is concerned, computed once per process.

    Covers: the config (without dtype, path, transformers version and use_cache); every
    parameter's name, shape and a strided sample of up to 4096 evenly spaced elements;
    and the tracked layers' weights (bias folded in) in full. Values are rounded to
    bfloat16 first, so factors fitted in bf16 serve a float32 run of the same checkpoint
    (and back) while any real change is caught: a change of a tracked weight always, a
    change elsewhere (attention, embeddings, norms) whenever it touches a sampled
    element, as fine-tuning, another checkpoint or a loaded adapter does. Buffers are
    not covered. The result is cached on the model, keyed by the tracked layer names and
    the parameters' storage and version counters, so later calls are free and in-place
    updates of a parameter are still seen.
    """
    key = (
        tuple(layer.name for layer in layers),
        tuple((name, p.data_ptr(), p._version, str(p.dtype)) for name, p in model.named_parameters()),
    )
    cache = model.__dict__.setdefault("_attrib_fingerprints", {})
    if key not in cache:
        cache.clear()  # one entry per model: an old key means old weights
        cache[key] = _fingerprint(model, layers)
    return cache[key]


FINGERPRINT_SAMPLES = 4096  # elements sampled from each parameter


def _fingerprint(model, layers: list[TrackedLayer]) -> str:
    import torch

    def update(tensor) -> None:
        digest.update(tensor.detach().to(torch.bfloat16).contiguous().cpu().view(torch.int16).numpy().tobytes())

    config = model.config.to_dict()
    for volatile in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "use_cache"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for layer in layers:
        digest.update(layer.name.encode())
        update(layer.weight_matrix())
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        flat = parameter.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:
            # integer positions, so every device samples the same elements
            positions = torch.arange(FINGERPRINT_SAMPLES, device=flat.device) * (flat.numel() - 1) // (FINGERPRINT_SAMPLES - 1)
            flat = flat[positions]
        update(flat)
    return digest.hexdigest()


def model_record(spec: str, model, layers: list[TrackedLayer]) -> dict:
    """What every manifest says about the model it was computed for."""
    return {
        "spec": spec,
        "model_type": model.config.model_type,
        "fingerprint": fingerprint(model, layers),
        "tracked_modules": [layer.name for layer in layers],
    }


def factor_bytes(layer: TrackedLayer, dtype_bytes: int = 4) -> int:
    """Bytes of one layer's EK-FAC factors: covariances, eigenvectors, eigenvalues and Λ."""
    d_in, d_out = layer.d_in_folded, layer.d_out
    covariance = d_in * d_in + d_out * d_out
    eigen = covariance + d_in + d_out
    return (covariance + eigen + d_in * d_out) * dtype_bytes


def load_meta_model(spec: str, trust_remote_code: bool = False):
    """The model's modules on the meta device: shapes and names without weights, so a directory
    holding only config.json (and the tokenizer) is enough and nothing is downloaded but the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(spec)
    with _loading(spec, " config"):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    return model
