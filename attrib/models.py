"""Load a Hugging Face causal LM, find the MLP layers to track, and fingerprint them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from attrib.errors import InputError

# model_type -> regex over module names that selects the MLP projections of every block.
MLP_PATTERNS = {
    "gpt2": r"\.mlp\.(c_fc|c_proj)$",
    "gpt_neox": r"\.mlp\.(dense_h_to_4h|dense_4h_to_h)$",
    "gptj": r"\.mlp\.(fc_in|fc_out)$",
    "opt": r"\.(fc1|fc2)$",
    "phi": r"\.mlp\.(fc1|fc2)$",
    "phi3": r"\.mlp\.(gate_up_proj|down_proj)$",
    **{
        name: r"\.mlp\.(gate_proj|up_proj|down_proj)$"
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
    },
}

DTYPES = ("float32", "bfloat16", "float16")


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
        """Input width with the bias folded in as a column of ones (DESIGN.md §2)."""
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
        raise InputError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return device


def looks_like_hub_id(spec: str) -> bool:
    """`name` or `org/name`, not a path that merely does not exist."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec) is not None and not spec.endswith((".json", ".jsonl"))


@contextlib.contextmanager
def _loading(spec: str, what: str = ""):
    """Turn a transformers loading failure into one line that says where attrib looked."""
    try:
        yield
    except (OSError, ValueError) as exc:
        where = "the directory" if Path(spec).expanduser().exists() else "the hub (is the network reachable?)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--model {spec}{what} could not be loaded from {where}: {first_line}") from exc


def model_source(spec: str) -> str:
    """The directory or hub id to load `spec` from; a mistyped path is named plainly, not sent to the hub."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = Path(spec).expanduser()
    if not path.exists() and not looks_like_hub_id(spec):
        raise InputError(f"--model {spec}: no such directory (and not a hub id)")
    if path.exists() and not (path / "config.json").is_file():
        raise InputError(f"--model {spec} has no config.json; give a directory saved with save_pretrained")
    return str(path) if path.exists() else spec


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer and config of a model, without its weights (for stages that only tokenize)."""
    from transformers import AutoConfig, AutoTokenizer

    source = model_source(spec)
    with _loading(spec, " tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    return tokenizer, config


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """The model (in eval mode, weights frozen) and its tokenizer, from a directory or hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    source = model_source(spec)
    with _loading(spec):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def find_tracked_layers(model, pattern: str | None = None) -> list[TrackedLayer]:
    """The linear layers to compute influence for: the MLP projections, or those `pattern` matches."""
    import torch
    from transformers.pytorch_utils import Conv1D

    model_type = getattr(model.config, "model_type", "?")
    if pattern is None:
        if model_type not in MLP_PATTERNS:
            raise InputError(
                f"attrib does not know the MLP layers of model type '{model_type}'; pass "
                "--modules REGEX (see `attrib inspect --modules '.*' --model M` for names) "
                "and please report the architecture"
            )
        pattern = MLP_PATTERNS[model_type]
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--modules {pattern!r} is not a valid regular expression: {exc}") from exc
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
    if not layers:
        raise InputError(
            f"--modules {pattern!r} matches no nn.Linear or Conv1D module of this {model_type} model"
        )
    return layers


def fingerprint(model, layers: list[TrackedLayer]) -> str:
    """sha256 of the config and of the tracked weights rounded to bfloat16.

    Rounding to bfloat16 lets factors fitted in bf16 serve a float32 run of the same
    checkpoint (and back) while any real change of the weights is still caught.
    """
    import torch

    config = model.config.to_dict()
    for volatile in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "use_cache"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for layer in layers:
        digest.update(layer.name.encode())
        weight = layer.weight_matrix().detach().to(torch.bfloat16).contiguous().cpu()
        digest.update(weight.view(torch.int16).numpy().tobytes())
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
