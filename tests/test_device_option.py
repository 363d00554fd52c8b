"""``--device cuda`` on a machine without CUDA: the one-line error names what the user typed."""

from __future__ import annotations

import pytest
import torch

from mtnlg.device import pick_device
from mtnlg.errors import ConfigError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_config_key_wording_is_the_default():
    with pytest.raises(ConfigError, match=r"^train\.device='cuda' but no CUDA device is visible; "
                                          r"use --train\.device=cpu$"):
        pick_device("cuda")


def test_a_command_line_option_is_named_as_typed():
    with pytest.raises(ConfigError, match=r"^--device cuda but no CUDA device is visible; use --device cpu$"):
        pick_device("cuda", "--device")
    with pytest.raises(ConfigError, match=r"^--device tpu is not one of \['auto', 'cpu', 'cuda'\]$"):
        pick_device("tpu", "--device")
    assert pick_device("auto", "--device") == torch.device("cpu")


def test_a_small_model_decodes_on_one_thread_and_a_large_one_keeps_its_threads():
    from torch import nn

    from mtnlg.device import SMALL_DECODE_BYTES, decode_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert decode_threads(nn.Linear(64, 64)) == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        big = nn.Linear(4096, SMALL_DECODE_BYTES // 4 // 4096 + 1, bias=False)  # just over the limit in fp32
        assert decode_threads(big) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
