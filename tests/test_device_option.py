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
