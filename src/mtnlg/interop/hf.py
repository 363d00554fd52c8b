"""Hugging Face interop: export an mtnlg model as a plain GPT-2 checkpoint, import GPT-2 checkpoints.

mtnlg's decoder *is* GPT-2's architecture (learned positions, pre-LN, GELU, tied head), so an
exported directory loads with ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` with no custom code. Three things differ in the weights::

    mtnlg  attn.qkv.weight  [3h, h]  rows ordered (head, {q,k,v}, head_dim)   (nn.Linear: [out, in])
    GPT-2  attn.c_attn.weight [h, 3h] cols ordered ({q,k,v}, head, head_dim)  (Conv1D:   [in, out])

* the fused QKV rows are regrouped from head-major to q/k/v-major (:func:`qkv_to_gpt2` and back);
* every GPT-2 ``Conv1D`` weight (c_attn, c_proj, c_fc) is the transpose of our ``nn.Linear`` weight;
* our embedding may be padded (``make_vocab_size_divisible_by``, tensor parallelism): only the real
  vocabulary rows are exported.

The activation names map ``gelu`` (exact erf) <-> ``gelu``, ``gelu_tanh`` <-> ``gelu_new``
(also ``gelu_pytorch_tanh``/``gelu_fast`` on import), ``relu`` <-> ``relu``.

Export reads models only through :meth:`mtnlg.api.MegatronLmModel.from_pretrained`, so every
checkpoint kind it understands (save_pretrained dirs, run dirs, DCP checkpoints saved under TP or
FSDP and resharded on load) exports the same way. Neither direction imports ``transformers``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mtnlg.atomic import atomic_directory
from mtnlg.checkpoint import verify_saved_model, write_manifest
from mtnlg.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
SUPPORTED_MODEL_TYPES = ("gpt2",)
# mtnlg activation -> the GPT-2 config's activation_function (export)
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# GPT-2 activation_function -> mtnlg activation (import); all tanh approximations are the same formula
ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu"}
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# -- weight layout ---------------------------------------------------------------------------------
def qkv_to_gpt2(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder a fused-QKV weight [3h, in] or bias [3h] from (head, qkv, d) rows to (qkv, head, d)."""
    rest = t.shape[1:]
    d = t.shape[0] // (3 * num_heads)
    return t.reshape(num_heads, 3, d, *rest).transpose(0, 1).reshape(3 * num_heads * d, *rest)


def qkv_from_gpt2(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`qkv_to_gpt2`: (qkv, head, d) rows -> (head, qkv, d)."""
    rest = t.shape[1:]
    d = t.shape[0] // (3 * num_heads)
    return t.reshape(3, num_heads, d, *rest).transpose(0, 1).reshape(3 * num_heads * d, *rest)


def to_gpt2_state_dict(state: dict[str, torch.Tensor], num_layers: int, num_heads: int,
                       vocab_size: int) -> dict[str, torch.Tensor]:
    """mtnlg GPT state dict -> GPT2LMHeadModel state dict (``transformer.*``; the tied head omitted)."""
    out = {"transformer.wte.weight": state["tok_embeddings.weight"][:vocab_size],
           "transformer.wpe.weight": state["pos_embeddings.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    for i in range(num_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}{ln}.weight"] = state[f"{src}{ln}.weight"]
            out[f"{dst}{ln}.bias"] = state[f"{src}{ln}.bias"]
        out[f"{dst}attn.c_attn.weight"] = qkv_to_gpt2(state[f"{src}attn.qkv.weight"], num_heads).t()
        out[f"{dst}attn.c_attn.bias"] = qkv_to_gpt2(state[f"{src}attn.qkv.bias"], num_heads)
        out[f"{dst}attn.c_proj.weight"] = state[f"{src}attn.proj.weight"].t()
        out[f"{dst}attn.c_proj.bias"] = state[f"{src}attn.proj.bias"]
        out[f"{dst}mlp.c_fc.weight"] = state[f"{src}mlp.fc1.weight"].t()
        out[f"{dst}mlp.c_fc.bias"] = state[f"{src}mlp.fc1.bias"]
        out[f"{dst}mlp.c_proj.weight"] = state[f"{src}mlp.fc2.weight"].t()
        out[f"{dst}mlp.c_proj.bias"] = state[f"{src}mlp.fc2.bias"]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def from_gpt2_state_dict(hf: dict[str, torch.Tensor], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """GPT-2 state dict (with or without the ``transformer.`` prefix) -> mtnlg GPT state dict."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(f"the GPT-2 checkpoint lacks tensor '{name}' (is it a complete GPT2LMHeadModel?)")
        return hf[name]

    out = {"tok_embeddings.weight": get("wte.weight"), "pos_embeddings.weight": get("wpe.weight"),
           "norm.weight": get("ln_f.weight"), "norm.bias": get("ln_f.bias")}
    for i in range(num_layers):
        src, dst = f"h.{i}.", f"layers.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}{ln}.weight"] = get(f"{src}{ln}.weight")
            out[f"{dst}{ln}.bias"] = get(f"{src}{ln}.bias")
        out[f"{dst}attn.qkv.weight"] = qkv_from_gpt2(get(f"{src}attn.c_attn.weight").t(), num_heads)
        out[f"{dst}attn.qkv.bias"] = qkv_from_gpt2(get(f"{src}attn.c_attn.bias"), num_heads)
        out[f"{dst}attn.proj.weight"] = get(f"{src}attn.c_proj.weight").t()
        out[f"{dst}attn.proj.bias"] = get(f"{src}attn.c_proj.bias")
        out[f"{dst}mlp.fc1.weight"] = get(f"{src}mlp.c_fc.weight").t()
        out[f"{dst}mlp.fc1.bias"] = get(f"{src}mlp.c_fc.bias")
        out[f"{dst}mlp.fc2.weight"] = get(f"{src}mlp.c_proj.weight").t()
        out[f"{dst}mlp.fc2.bias"] = get(f"{src}mlp.c_proj.bias")
    return {k: v.contiguous() for k, v in out.items()}


# -- configs ---------------------------------------------------------------------------------------
def gpt2_config(config: Any, eod_id: int | None = None, pad_id: int | None = None,
                dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` of a GPT2LMHeadModel equivalent to a :class:`~mtnlg.api.MegatronModelConfig`."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_position_embeddings,
        "n_embd": config.hidden_size, "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads,
        "n_inner": config.intermediate_size, "activation_function": ACT_TO_HF[config.activation_function],
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "layer_norm_epsilon": config.layernorm_eps, "initializer_range": config.init_method_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": True, "use_cache": config.use_cache,
        "bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": pad_id,
        "torch_dtype": dtype, "dtype": dtype,
    }


def config_from_gpt2(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """MegatronModelConfig keywords from a GPT-2 ``config.json`` (raises on what mtnlg cannot represent)."""
    archs = hf.get("architectures") or []
    mtype = hf.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        what = ", ".join(archs) or f"model_type={mtype!r}"
        raise CheckpointError(f"{source}: unsupported architecture {what}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACT_FROM_HF:
        raise CheckpointError(f"{source}: activation_function={act!r} is not supported; supported: "
                              f"{', '.join(ACT_FROM_HF)}")
    unsupported = {"scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
                   "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
                   "add_cross_attention": (False, hf.get("add_cross_attention", False)),
                   "tie_word_embeddings": (True, hf.get("tie_word_embeddings", True))}
    for key, (want, got) in unsupported.items():
        if bool(got) != want:
            raise CheckpointError(f"{source}: {key}={got} is not supported by mtnlg's GPT (needs {want})")
    n_embd = hf.get("n_embd", 768)
    return dict(vocab_size=hf.get("vocab_size", 50257), hidden_size=n_embd,
                num_hidden_layers=hf.get("n_layer", 12), num_attention_heads=hf.get("n_head", 12),
                intermediate_size=hf.get("n_inner") or 4 * n_embd,
                max_position_embeddings=hf.get("n_positions", 1024),
                layernorm_eps=hf.get("layer_norm_epsilon", 1e-5),
                init_method_std=hf.get("initializer_range", 0.02),
                activation_function=ACT_FROM_HF[act], use_cache=bool(hf.get("use_cache", True)))


# -- tokenizer -------------------------------------------------------------------------------------
def save_hf_tokenizer(tokenizer: Any, directory: Path, max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` that
    ``AutoTokenizer.from_pretrained`` loads as a ``PreTrainedTokenizerFast`` with no custom code."""
    from mtnlg.data.tokenizer import EOD, PAD, SPECIAL_TOKENS

    tokenizer.save(directory)
    specials = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None]
    extra = [t for t in specials if t not in (EOD, PAD)]
    pad = PAD if tokenizer.token_to_id(PAD) is not None else None  # GPT-2's own tokenizer has none
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                             "single_word": False, "special": True} for t in specials}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "bos_token": EOD, "eos_token": EOD, "unk_token": EOD, "pad_token": pad,
              "additional_special_tokens": extra, "extra_special_tokens": extra,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": added}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special_map = {"bos_token": EOD, "eos_token": EOD, "unk_token": EOD, "pad_token": pad,
                   "additional_special_tokens": extra}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))


def load_hf_tokenizer(directory: Path):
    """Our :class:`~mtnlg.data.tokenizer.Tokenizer` from a HF ``tokenizer.json`` (or GPT-2's original
    ``vocab.json`` + ``merges.txt``), or None if there is none.

    The vocabulary is never grown: mtnlg's end-of-document token must be the tokenizer's own
    ``<|endoftext|>`` (refused clearly otherwise), and without a ``<|pad|>`` token (GPT-2's own
    tokenizer has none) padding reuses ``<|endoftext|>``. Returns ``(tokenizer, [])``."""
    from tokenizers import Tokenizer as HFTokenizer

    from mtnlg.data.tokenizer import EOD, Tokenizer

    path = directory / "tokenizer.json"
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    try:
        if path.is_file():
            hf = HFTokenizer.from_file(str(path))
        elif vocab.is_file() and merges.is_file():  # GPT-2's original (slow tokenizer) files
            from tokenizers import models

            from mtnlg.data.tokenizer import _finish

            hf = _finish(HFTokenizer(models.BPE.from_file(str(vocab), str(merges))))
            if hf.token_to_id(EOD) is not None:
                hf.add_special_tokens([EOD])
        else:
            return None, []
    except Exception as e:  # tokenizers raises a bare Exception
        raise CheckpointError(f"{directory}: invalid tokenizer files ({str(e).splitlines()[0]})") from None
    if hf.token_to_id(EOD) is None:
        raise CheckpointError(f"{directory}: the tokenizer has no {EOD} token, which mtnlg uses to end documents; "
                              "mtnlg does not add tokens on import (that would grow the vocabulary)")
    return Tokenizer(hf), []


# -- files -----------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(model: Any, output: str | Path, dtype: str = "float32") -> Path:
    """Write ``model`` (a :class:`~mtnlg.api.MegatronLmModel`) as a Hugging Face GPT-2 directory:
    ``config.json``, ``model.safetensors`` (``dtype``: float32, bfloat16 or float16), tokenizer files
    and ``generation_config.json``."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not one of {list(DTYPES)}")
    from safetensors.torch import save_file

    model._ensure_materialized()
    cfg = model.config
    tok = model.tokenizer
    out = Path(output)
    state = {k: v.float() for k, v in model.model.state_dict().items()}
    hf_state = to_gpt2_state_dict(state, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size)
    hf_state = {k: v.to(DTYPES[dtype]) for k, v in hf_state.items()}
    with atomic_directory(out) as tmp:
        save_file(hf_state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        own_pad = tok.pad_id if tok.pad_id != tok.eod_id else None  # no pad token of its own: none, as GPT-2
        (tmp / "config.json").write_text(json.dumps(gpt2_config(cfg, tok.eod_id, own_pad, dtype), indent=2))
        # No length: a saved max_length makes transformers warn on every generate(max_new_tokens=...)
        # (and a saved max_new_tokens would override a caller's max_length); callers pass their own.
        gen = {"bos_token_id": tok.eod_id, "eos_token_id": tok.eod_id, "pad_token_id": tok.pad_id, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        save_hf_tokenizer(tok, tmp, cfg.max_position_embeddings)
        write_manifest(tmp, fmt="mtnlg-hf-export-1")  # checksums, verified when mtnlg imports it again
    log.info("exported %s parameters to %s", f"{sum(v.numel() for v in hf_state.values()):,}", out)
    return out


def export_checkpoint(checkpoint: str | Path, output: str | Path, dtype: str = "float32") -> Path:
    """Load ``checkpoint`` through :meth:`MegatronLmModel.from_pretrained` and :func:`export_hf` it."""
    from mtnlg.api import MegatronLmModel

    return export_hf(MegatronLmModel.from_pretrained(checkpoint), output, dtype)


def read_gpt2_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, state dict)`` of a Hugging Face GPT-2 directory (one or sharded safetensors files)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"--input {d}: no config.json (expected a Hugging Face model directory)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    config_from_gpt2(hf_cfg, str(d))  # reject unsupported architectures before reading weights
    index = d / "model.safetensors.index.json"
    if (d / WEIGHTS_FILE).is_file():
        files = [d / WEIGHTS_FILE]
    elif index.is_file():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        bins = [p.name for p in d.glob("*.bin")]
        hint = f" (found {bins[0]}: re-save it with safe_serialization=True)" if bins else ""
        raise CheckpointError(f"--input {d}: no model.safetensors or model.safetensors.index.json{hint}")
    verify_saved_model(d, [f.name for f in files])
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({e})") from None
    return hf_cfg, state


def import_hf(input_dir: str | Path, output: str | Path | None = None):
    """Build a :class:`~mtnlg.api.MegatronLmModel` from a GPT-2-architecture HF directory; with
    ``output``, also ``save_pretrained`` it there. Returns the model (fp32, CPU)."""
    from mtnlg.api import MegatronLmModel, MegatronModelConfig
    from mtnlg.model.init import materialize

    d = Path(input_dir)
    hf_cfg, hf_state = read_gpt2_dir(d)
    kwargs = config_from_gpt2(hf_cfg, str(d))
    tokenizer, _ = load_hf_tokenizer(d)
    state = from_gpt2_state_dict(hf_state, kwargs["num_hidden_layers"], kwargs["num_attention_heads"])
    hf_vocab = state["tok_embeddings.weight"].shape[0]
    if hf_vocab != kwargs["vocab_size"]:
        raise CheckpointError(f"{d}: wte has {hf_vocab} rows but config.json says vocab_size={kwargs['vocab_size']}")
    if tokenizer is not None and tokenizer.vocab_size > hf_vocab:
        raise CheckpointError(f"{d}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{hf_vocab} embedding rows; mtnlg does not grow the vocabulary on import")
    if tokenizer is None:
        log.warning("%s has no tokenizer.json; the imported model gets mtnlg's byte tokenizer", d)
    try:
        model = MegatronLmModel(MegatronModelConfig(**kwargs), tokenizer=tokenizer)
    except ConfigError as e:
        raise CheckpointError(f"{d}: {e}") from None
    materialize(model.model, device="cpu", dtype=torch.float32, init=False)
    missing, unexpected = model.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "output.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{d}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.model.tie_weights()
    model.model.eval()
    if output is not None:
        model.save_pretrained(output)
    return model
