"""`load_model` / `load_tokenizer`: one place that turns a model name into a ready model.

Names: a hub id (default Qwen/Qwen3-0.6B), a local directory (e.g. an SFT output), `tiny` (built-in
random-weight test model), or `random:<hub id>` (that shape, Qwen3, Qwen2.5 or Llama, with random
weights, for benchmarks).
Offline and not found locally, loading fails with one line that names the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from common.distributed import default_device
from common.errors import fail
from models.offline import cached_first
from models.tiny import PAD, _init_model, random_config, random_model, tiny_config, tiny_dir

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
# Rollouts and the training forward pass their KV cache as `cache=`; releases before 5.24 call it
# `past_key_values=` and silently drop `cache=` (every decode step would then run without its prompt).
MIN_TRANSFORMERS = "5.24"
TINY = "tiny"
RANDOM_PREFIX = "random:"


def default_dtype(device: str) -> Any:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and lossy for training)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _source(name_or_path: str) -> str:
    """What to pass to from_pretrained: the tiny cache folder, a local folder, or the hub id."""
    if name_or_path == TINY:
        return str(tiny_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            fail(f"{path} is not a model folder (no config.json); pass the folder an SFT/GRPO run saved")
        check_model_folder(path)
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        fail(f"model folder {name_or_path} does not exist; check the path (or run SFT first)")
    return name_or_path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_folder(path: Path) -> None:
    """One line naming the folder and what it lacks, before transformers meets it (it would raise a
    traceback about sentencepiece/tiktoken for a missing tokenizer)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        fail(f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it beside the "
             f"model with tokenizer.save_pretrained('{path}')")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        fail(f"model folder {path} has no weights (none of {', '.join(WEIGHT_FILES)}); the run that wrote it may "
             f"have stopped before its final save")


def _unloadable(path: str, exc: Exception) -> NoReturn:
    """One line for a local folder transformers cannot load: unknown architecture, corrupt weights..."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "does not recognize this architecture" in text:
        from importlib.metadata import version

        fail(f"model folder {path}: its config.json names an architecture transformers {version('transformers')} "
             f"does not know ({text.split('model type')[-1].split(' but')[0].strip()}); upgrade transformers or "
             f"fix config.json")
    if type(exc).__name__ == "SafetensorError":
        fail(f"model folder {path}: a weights file is corrupt or truncated ({text}); save or copy the model again")
    fail(f"model folder {path} cannot be loaded: {type(exc).__name__}: {text}")


def _not_found(name: str, exc: Exception) -> None:
    fail(
        f"cannot load {name!r}: not a local folder and not in the hub cache, and the hub is unreachable "
        f"({type(exc).__name__}). Pass a local model folder, or `tiny` for the built-in offline model"
    )


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """The tokenizer, set for batched generation: left padding, no BOS, eos <|im_end|>, pad set."""
    from transformers import AutoTokenizer

    if name_or_path.startswith(RANDOM_PREFIX):
        try:  # the real tokenizer when it is cached; otherwise the tiny one (ids fit any Qwen3 vocab)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path[len(RANDOM_PREFIX):], local_files_only=True)
        except Exception:  # noqa: BLE001
            tokenizer = AutoTokenizer.from_pretrained(tiny_dir())
    else:
        source = _source(name_or_path)
        try:
            tokenizer = cached_first(AutoTokenizer.from_pretrained, source)
        except Exception as exc:  # noqa: BLE001
            if Path(source).is_dir():
                _unloadable(source, exc)
            if isinstance(exc, OSError):
                _not_found(name_or_path, exc)
            raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD if PAD in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def require_4bit(device: str) -> None:
    """Fail in one line, before any work, where bitsandbytes cannot run NF4 on `device`."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        probe = torch.randn(64, 64, device=device, dtype=torch.float32)
        bnbf.quantize_4bit(probe, quant_type="nf4")
    except ImportError:
        fail("4-bit needs bitsandbytes: pip install 'bitsandbytes>=0.45' (or drop --use_4bit)")
    except Exception as exc:  # noqa: BLE001 - any backend failure means the same fix
        fail(f"bitsandbytes cannot run 4-bit NF4 on {device} here ({type(exc).__name__}: {exc}); drop --use_4bit")


def require_transformers(found: str | None = None) -> None:
    """Fail in one line when the installed transformers (or `found`) is older than MIN_TRANSFORMERS."""
    from importlib.metadata import version

    from packaging.version import Version

    found = found or version("transformers")
    if Version(found) < Version(MIN_TRANSFORMERS):
        fail(f"transformers {found} is too old: this project needs {MIN_TRANSFORMERS} or newer (older releases "
             f"ignore the KV cache it passes as `cache=`): pip install -U 'transformers>={MIN_TRANSFORMERS}'")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: Any = None,
    load_in_4bit: bool = False,
    tokenizer: Any = None,
) -> Any:
    """A causal LM on `device` in `dtype` (defaults: CUDA if present, bf16 there and fp32 on CPU).

    `load_in_4bit` quantizes the linear layers to NF4 (bitsandbytes), compute in `dtype`. The model's
    pad/eos ids are aligned with the tokenizer's so generation stops at the end-of-turn token.
    """
    require_transformers()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    tokenizer = tokenizer or load_tokenizer(name_or_path)
    if name_or_path.startswith(RANDOM_PREFIX):
        if load_in_4bit:
            fail("4-bit needs trained weights; use it with a hub id or a local folder, not random:")
        model = random_model(name_or_path[len(RANDOM_PREFIX):], tokenizer).to(device=device, dtype=dtype)
    else:
        # use_kernels=False: the model's own modules, never hub kernels (models/offline.py says why)
        kwargs: dict[str, Any] = {"dtype": dtype, "use_kernels": False}
        if load_in_4bit:
            require_4bit(device)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
            kwargs["device_map"] = {"": torch.device(device)}
        source = _source(name_or_path)
        local = Path(source).is_dir()
        try:
            model = cached_first(AutoModelForCausalLM.from_pretrained, source, **kwargs)
        except Exception as exc:  # noqa: BLE001 - each case becomes one line naming the folder
            if local:
                _unloadable(source, exc)
            if isinstance(exc, OSError):
                _not_found(name_or_path, exc)
            raise
        if not load_in_4bit:
            model = model.to(device)
        else:
            keep_4bit_trainable(model)
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.bos_token_id = None
    return model


def model_config(name_or_path: str) -> Any:
    """The config of any name load_model takes (`tiny`, random:<hub id>, a folder, a hub id), without
    loading weights: the memory ledger's shapes."""
    if name_or_path == TINY:
        return tiny_config(load_tokenizer(TINY))
    if name_or_path.startswith(RANDOM_PREFIX):
        return random_config(name_or_path[len(RANDOM_PREFIX):], load_tokenizer(TINY))
    from transformers import AutoConfig

    source = _source(name_or_path)
    try:
        return cached_first(AutoConfig.from_pretrained, source)
    except OSError as exc:
        _not_found(name_or_path, exc)


def with_layers(config: Any, layers: int) -> Any:
    """`config` cut to its first `layers` layers (in place), per-layer types included."""
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


def shape_model(name_or_path: str, layers: int) -> Any:
    """The shape of model `name_or_path` with `layers` layers and random weights (seed 0), on the CPU in
    fp32: ledgers and counts take 1 and 2 layers of a real shape and scale to its depth."""
    return _init_model(with_layers(model_config(name_or_path), layers), 0)


def keep_4bit_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight the first time it runs
    in eval mode without grad (a rollout, an eval) and from then on uses a kernel with no backward,
    even in train mode: every later QLoRA step would get wrong LoRA gradients. GPUs never take that
    path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model_and_tokenizer(name_or_path: str = DEFAULT_MODEL, **kwargs: Any) -> tuple[Any, Any]:
    tokenizer = load_tokenizer(name_or_path)
    return load_model(name_or_path, tokenizer=tokenizer, **kwargs), tokenizer


def frozen_copy(model: Any, dtype: Any) -> Any:
    """A frozen, eval-mode copy of `model` (GRPO's reference) with its parameters in `dtype` and its
    buffers as they are. `copy.deepcopy(model).to(bf16)` would also cast the rotary `inv_freq`
    buffers (a phase error of ~0.6 rad by position 660): a reference that is not the policy, with KL
    above 0 at step 0. `from_pretrained(dtype=...)` keeps those buffers in fp32 too."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.data = p.data.to(dtype)
    return ref.eval().requires_grad_(False)


def autocast(device: str) -> Any:
    """The compute policy of every stage: bf16 autocast on CUDA, plain fp32 elsewhere."""
    import torch

    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
