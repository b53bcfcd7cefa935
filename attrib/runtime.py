"""What a call runs with, as a context instead of module globals: who called (the command line
or the Python API, so errors name options in the caller's words), quiet, debug, this process's
rank; and the model a stage borrows for the call.

    with runtime.session(caller="api", quiet=True):   # nested calls inherit what they do not set
        ...

A session is a `contextvars` value set for the block and restored after it, so `quiet=True`
in one API call never silences the next, and a command's `--quiet` reaches the stage it runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from attrib.errors import InputError


@dataclass(frozen=True)
class Runtime:
    caller: str = "api"  # "cli": options are named as flags (--max-length); "api": as keywords (max_length=)
    quiet: bool = False
    debug: bool = False  # every rank prints progress, not only rank 0
    rank: int | None = None  # None: from the RANK / LOCAL_RANK environment variables
    said: set = field(default_factory=set, compare=False)  # keys of the warnings given once in this session


_CURRENT: contextvars.ContextVar[Runtime] = contextvars.ContextVar("attrib_runtime", default=Runtime())


def current() -> Runtime:
    return _CURRENT.get()


@contextlib.contextmanager
def session(**changes) -> Iterator[Runtime]:
    """The current runtime with `changes` (None values leave a setting as it is) for the block."""
    changes = {key: value for key, value in changes.items() if value is not None}
    runtime = replace(current(), said=set(), **changes)
    token = _CURRENT.set(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.reset(token)


def configure(**changes) -> None:
    """Change the runtime for the rest of the current session (a stage learns its rank when its World
    starts; a script may set quiet once for all its calls)."""
    _CURRENT.set(replace(current(), **changes))


def warn_once(key: str, text: str) -> None:
    """A warning line (attrib.progress.message) the first time `key` comes up in this session."""
    from attrib.progress import message

    said = current().said
    if key not in said:
        said.add(key)
        message(f"warning: {text}")


def rank() -> int:
    value = current().rank
    if value is not None:
        return value
    for variable in ("RANK", "LOCAL_RANK"):
        text = os.environ.get(variable, "")
        if text.strip().isdigit():
            return int(text)
    return 0


def flag(name: str, value=None) -> str:
    """An option as the caller wrote it: `--max-length 1` on the command line, `max_length=1` in Python."""
    if current().caller == "cli":
        from attrib.options import cli_flag  # options imports this module

        text = cli_flag(name)
        return text if value is None else f"{text} {value}"
    if value is None:
        return f"{name}="
    return f"{name}={value if isinstance(value, (bool, int, float)) else str(value)!r}"


# --------------------------------------------------------------------------- the model of a call


def is_loaded_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "named_modules") and hasattr(model, "parameters")


@contextlib.contextmanager
def model_in_use(model, tokenizer, dtype: str, device: str, trust_remote_code: bool,
                 revision: str | None = None) -> Iterator[tuple[str, object, object]]:
    """(spec recorded in manifests, model in eval mode with frozen weights, tokenizer).

    A path or hub id is loaded (at `revision`) in `dtype` on `device`; a loaded model is used as it is
    and its training mode and requires_grad flags are restored afterwards.
    """
    from attrib.models import load_model, model_label
    from attrib.progress import libraries_quiet

    if isinstance(model, (str, os.PathLike)):
        with libraries_quiet("transformers"):
            lm, loaded_tokenizer = load_model(str(model), dtype, device, trust_remote_code, revision)
            yield model_label(str(model), revision), lm, tokenizer if tokenizer is not None else loaded_tokenizer
        return
    if revision is not None:
        raise InputError(f"{flag('revision', revision)} selects what to load, but the model is loaded already")
    if tokenizer is None:
        raise InputError(f"a loaded model needs its tokenizer: pass {flag('tokenizer')}")
    parameters = list(model.parameters())
    training, flags = model.training, [p.requires_grad for p in parameters]
    model.eval()
    model.requires_grad_(False)
    try:
        with libraries_quiet("transformers"):
            yield getattr(model, "name_or_path", "") or f"<{type(model).__name__} object>", model, tokenizer
    finally:
        model.train(training)
        for parameter, flag_value in zip(parameters, flags):
            parameter.requires_grad_(flag_value)


def device_of(model, device: str) -> str:
    """The device to run on: `device`, or a loaded model's own (which `device` must then agree with)."""
    if isinstance(model, (str, os.PathLike)):
        from attrib.models import model_source

        model_source(str(model))  # a mistyped model path is named before anything is read
        return device
    if not is_loaded_model(model):
        raise InputError(
            f"model must be a directory, a hub id or a loaded transformers model, not {type(model).__name__}"
        )
    own = str(next(model.parameters()).device)
    if device not in ("auto", own) and not (device == "cuda" and own.startswith("cuda")):
        raise InputError(f"the model is on {own} but {flag('device', device)}; move the model or pass "
                         f"{flag('device', own)}")
    return own


def default_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 compute on CUDA (statistics stay float32), float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


@contextlib.contextmanager
def borrowed_model(model, tokenizer, options, timeout: float | None = None) -> Iterator[tuple]:
    """(world, model spec, model, tokenizer) for a stage: the processes started, the model loaded
    or borrowed on the world's device; everything given back (and the process group closed) after."""
    from attrib.distributed import detect_world

    device = device_of(model, options.device)
    world = detect_world(device, **({} if timeout is None else {"timeout": timeout}))
    try:
        dtype = default_dtype(options.dtype, world.device)
        with model_in_use(model, tokenizer, dtype, world.device, options.trust_remote_code,
                          options.revision) as (spec, lm, tok):
            yield world, spec, lm, tok
    finally:
        world.close()
