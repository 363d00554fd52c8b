"""GGUF export for llama.cpp: an mtnlg model as a ``general.architecture = "gpt2"`` file.

mtnlg's decoder is GPT-2's architecture, so the file follows what llama.cpp's own
``convert_hf_to_gguf.py`` (``GPT2Model``) writes for a Hugging Face GPT-2 checkpoint: the model goes
through the same GPT-2 state dict as the Hugging Face export (:func:`mtnlg.interop.hf.to_gpt2_state_dict`,
fused QKV regrouped q/k/v-major), every ``Conv1D`` weight is transposed back to ``[out, in]`` (which
ggml reads as ``ne = [in, out]``), and the tensors are renamed::

    transformer.wte / wpe         -> token_embd / position_embd
    h.N.ln_1 / ln_2               -> blk.N.attn_norm / blk.N.ffn_norm
    h.N.attn.c_attn / c_proj      -> blk.N.attn_qkv / blk.N.attn_output
    h.N.mlp.c_fc / c_proj         -> blk.N.ffn_up / blk.N.ffn_down
    ln_f                          -> output_norm      (the head is tied: no output.weight)

Precisions (``gguf_type``): ``f32``; ``f16`` and ``q8_0`` convert the 2-D matrices only, as
``convert_hf_to_gguf`` does: biases, LayerNorms and ``position_embd`` stay f32, and a matrix whose
rows are not a multiple of q8_0's 32-element block falls back to f16.

llama.cpp's GPT-2 graph uses the tanh-approximated GELU; an mtnlg model with ``gelu_tanh`` decodes the
same tokens, one with exact ``gelu`` is close but not bit-equal, and ``relu`` cannot be represented
(refused).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtnlg.errors import ConfigError

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
ARCH = "gpt2"
PRE_TOKENIZER = "gpt-2"  # GPT-2's regex + byte-level BPE, which is what mtnlg's tokenizer uses
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2 name (without "transformer.") -> GGUF name; "{}" is the block index
NAMES = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
         "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
BLOCK_NAMES = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
KEEP_F32 = ("position_embd.weight",)  # convert_hf_to_gguf forces POS_EMBD to f32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("--to gguf needs the 'gguf' package: pip install 'mtnlg[interop]'") from None
    return gguf


def gguf_name(hf_name: str) -> str:
    """GPT-2 tensor name (with or without ``transformer.``) -> llama.cpp's GGUF name."""
    name = hf_name.removeprefix("transformer.")
    if name in NAMES:
        return NAMES[name]
    _, idx, rest = name.split(".", 2)  # h.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{idx}.{BLOCK_NAMES[module]}.{kind}"


def gguf_tensors(model: Any) -> dict[str, np.ndarray]:
    """llama.cpp GPT-2 tensors (float32 numpy, PyTorch ``[out, in]`` shapes) of a :class:`MegatronLmModel`."""
    from mtnlg.interop.hf import to_gpt2_state_dict

    model._ensure_materialized()
    cfg = model.config
    state = {k: v.float() for k, v in model.model.state_dict().items()}
    hf_state = to_gpt2_state_dict(state, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size)
    out = {}
    for name, t in hf_state.items():
        if name.endswith(CONV1D):  # Conv1D [in, out] -> [out, in], as convert_hf_to_gguf does
            t = t.t()
        out[gguf_name(name)] = t.contiguous().numpy().astype(np.float32)
    return out


def tensor_type(name: str, array: np.ndarray, gguf_type: str):
    """The GGML type a tensor is stored as under ``gguf_type`` (see the module docstring)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if gguf_type == "f32" or array.ndim < 2 or name.endswith("_norm.weight") or name in KEEP_F32:
        return q.F32
    if gguf_type == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return q.Q8_0
    return q.F16


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token types, merges)`` as ``convert_hf_to_gguf`` writes a GPT-2 BPE tokenizer; rows of a
    padded embedding beyond the tokenizer get ``[PAD{i}]`` tokens of type UNUSED."""
    import json

    from mtnlg.data.tokenizer import EOD, PAD

    gguf = _gguf()
    kind = gguf.TokenType
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} "
                          "embedding rows (model.vocab_size); re-train or re-export with a matching tokenizer")
    hf = tokenizer.hf
    vocab = hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(kind.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(kind.CONTROL if added[i].special else kind.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(kind.NORMAL)
    merges = json.loads(hf.to_str())["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not merges:  # llama.cpp requires the key and the gguf package refuses an empty array: one merge
        merges = [f"{EOD} {PAD}"]  # of two special tokens, which BPE never sees (they are split out first)
    return tokens, [int(t) for t in types], merges


def check_output_file(output: str | Path, force: bool = False, source: str | Path | None = None) -> Path:
    """``output`` as a Path; refused when a directory, an existing file (unless ``force``) or inside ``source``."""
    out = Path(output)
    if out.is_dir():
        raise ConfigError(f"--output {out} is a directory; give a file name such as model.gguf")
    if out.exists() and not force:
        raise ConfigError(f"--output {out} exists; choose another file name or pass --force to replace it")
    if source is not None and out.resolve().is_relative_to(Path(source).resolve()):
        raise ConfigError(f"--output {out} lies inside the input {source}; choose a file outside it")
    return out


def export_gguf(model: Any, output: str | Path, gguf_type: str = "f32", force: bool = False,
                source: str | Path | None = None) -> Path:
    """Write ``model`` (a :class:`~mtnlg.api.MegatronLmModel`) to the GGUF file ``output`` for llama.cpp's
    GPT-2 architecture (written to a temporary name, then renamed). An existing file is replaced only
    with ``force``; ``output`` may not lie inside ``source`` (the checkpoint read). Returns the path."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type} is not one of {list(GGUF_TYPES)}")
    cfg = model.config
    if cfg.activation_function == "relu":
        raise ConfigError("--to gguf: llama.cpp's GPT-2 architecture has GELU only; this model uses "
                          "activation_function='relu' (export it with --to hf instead)")
    if cfg.activation_function == "gelu":
        log.warning("the model uses exact GELU; llama.cpp's GPT-2 uses the tanh approximation, so its "
                    "logits will differ slightly (train with activation gelu_tanh for identical tokens)")
    gguf = _gguf()
    tensors = gguf_tensors(model)
    tok = model.tokenizer
    tokens, types, merges = vocabulary(tok, cfg.vocab_size)
    out = check_output_file(output, force, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    try:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_name("mtnlg")
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_layer_norm_eps(cfg.layernorm_eps)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZER)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.eod_id)
        w.add_eos_token_id(tok.eod_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        for name, array in tensors.items():
            qtype = tensor_type(name, array, gguf_type)
            if qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, array)
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, array.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %d tensors (%s) to %s", len(tensors), gguf_type, out)
    return out


def export_checkpoint(checkpoint: str | Path, output: str | Path, gguf_type: str = "f32",
                      force: bool = False) -> Path:
    """Load ``checkpoint`` through :meth:`MegatronLmModel.from_pretrained` and :func:`export_gguf` it."""
    from mtnlg.api import MegatronLmModel

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type} is not one of {list(GGUF_TYPES)}")
    _gguf()
    check_output_file(output, force, checkpoint)
    with torch.no_grad():
        return export_gguf(MegatronLmModel.from_pretrained(checkpoint), output, gguf_type, force, checkpoint)
