"""GGUF export: a Hugging Face Llama-architecture model directory → one .gguf file for llama.cpp and its clients.

Written with the `gguf` package (llama.cpp's own Python library for the format) the way llama.cpp's
`convert_hf_to_gguf.py` writes a Llama model: its tensor names (`gguf.get_tensor_name_map`), the Q and K
projections permuted into llama.cpp's rotary layout, 1-D tensors (norms) kept in f32, no output tensor when
the embeddings are tied, and the tokenizer as a GPT-2 byte-level BPE vocabulary whose merges, special-token
ids and chat template come from `gguf.SpecialVocab`. That converter is a script inside llama.cpp's source,
not part of any installable package, so the Llama case of it is restated here on top of the library.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from rlhflab.errors import UserError
from rlhflab.files import atomic_file

DTYPES = ("f32", "f16", "q8_0")  # the tensor types of 2-D weights an export can choose
SUPPORTED = ("Llama-architecture models (LlamaForCausalLM, e.g. the embedded SmolLM2, and runs trained on them) "
             "with a GPT-2-style byte-level BPE tokenizer")
Q8_BLOCK = 32  # Q8_0 quantises rows in blocks of 32 values; other row lengths stay f16, as llama.cpp does


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32", name: str | None = None) -> Path:
    """Write the model in `model_dir` (a Hugging Face directory) to `out` as GGUF, 2-D weights in `dtype`.

    `name` becomes general.name (default: the directory's name). The file appears atomically: a failed
    export leaves no half-written file.
    """
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not a GGUF export type; use one of {', '.join(DTYPES)}")
    if out.suffix != ".gguf" or out.is_dir():
        raise UserError(f"--out {out} must name a .gguf file")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it first")
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "model_type", None) != "llama":
        raise UserError(f"{model_dir} is a '{config.model_type}' model; GGUF export supports {SUPPORTED}")
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{model_dir}: rope scaling '{rope['rope_type']}' is not supported by the GGUF export; "
                        f"it supports {SUPPORTED} without rope scaling")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pre = pre_tokenizer_name(model_dir / "tokenizer.json")
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config.vocab_size)
    if not special.merges:
        raise UserError(f"{model_dir}: the tokenizer has no BPE merges, and llama.cpp loads no GPT-2 vocabulary "
                        f"without them; GGUF export supports {SUPPORTED}")
    # whether clients that tokenize raw text add BOS/EOS, as the HF tokenizer does (this gguf release reads it
    # only from a tokenizer_config.json key, which transformers no longer writes)
    ids = tokenizer("a").input_ids
    special.add_special_token.setdefault("bos", ids[0] == tokenizer.bos_token_id)
    special.add_special_token.setdefault("eos", ids[-1] == tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    def build(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_hparams(writer, config, rope["rope_theta"], name or model_dir.resolve().name, file_type)
        _add_vocab(writer, tokenizer, pre, config.vocab_size)
        special.add_to_gguf(writer, quiet=True)
        for gguf_name, data, qtype in _tensors(model, config, dtype):
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # the writer logs every step at INFO
    try:
        atomic_file(out, build)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}; pick a writable --out") from None
    finally:
        gguf_log.setLevel(level)
    return out


def pre_tokenizer_name(tokenizer_json: Path) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the way a tokenizer.json splits text before BPE.

    llama.cpp re-implements each pre-tokenizer by name; its converter recognises them by hashing tokenizer
    output against a table of known models. Here the split is read from the tokenizer's own description:
    GPT-2's regex (`gpt-2`), or single digits first and then GPT-2's regex (`smollm`, SmolLM2's hub tokenizer).
    """
    if not tokenizer_json.is_file():
        raise UserError(f"{tokenizer_json.parent} has no tokenizer.json; GGUF export supports {SUPPORTED}")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_bpe = (model.get("type") == "BPE" and not model.get("byte_fallback")
                and (spec.get("decoder") or {}).get("type") == "ByteLevel" and spec.get("normalizer") is None)

    def gpt2_split(step: dict) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if byte_bpe and len(steps) == 1 and gpt2_split(steps[0]):
        return "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    if byte_bpe and len(steps) == 2 and steps[0] == digits and gpt2_split(steps[1]):
        return "smollm"
    raise UserError(f"{tokenizer_json}: tokenizer (model {model.get('type')}, pre-tokenizer {json.dumps(pre)}) has "
                    f"no known llama.cpp equivalent; GGUF export supports {SUPPORTED}")


def _add_hparams(writer, config, rope_theta: float, name: str, file_type) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, tokenizer, pre: str, vocab_size: int) -> None:
    """Token strings and types by id: added special tokens are CONTROL (parsed only when asked to), other
    added tokens USER_DEFINED, ids without a token padding entries."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Q/K rows from Hugging Face's rotary layout (the two halves of each head apart) to llama.cpp's (the two
    parts of each rotated pair next to each other): convert_hf_to_gguf's `permute`. (out, in) → same shape."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensors(model, config, dtype: str):
    """(GGUF name, data, raw quantisation type or None) for every weight, in the state dict's order."""
    import gguf
    from gguf.quants import quantize

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses the token embeddings when the file has no output tensor
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"tensor '{hf_name}' has no GGUF name for the llama architecture; GGUF export "
                            f"supports {SUPPORTED}")
        data = tensor.detach().float().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rotary(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rotary(data, n_kv)
        if data.ndim <= 1 or dtype == "f32":
            yield gguf_name, data, None
        elif dtype == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
            yield gguf_name, quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        else:
            yield gguf_name, data.astype(np.float16), None
