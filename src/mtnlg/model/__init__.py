"""The MT-NLG decoder, its initialisation and (later) quantization and prompt tuning."""

from mtnlg.model.init import build_model, init_weights, materialize
from mtnlg.model.kv_cache import KVCache
from mtnlg.model.transformer import GPT, count_parameters

__all__ = ["GPT", "KVCache", "build_model", "count_parameters", "init_weights", "materialize"]
