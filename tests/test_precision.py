"""The one automatic precision choice (runtime.precision), shared by generate, train and evaluate."""
import pytest
import torch

from hscr_fast import HscrError
from hscr_fast.runtime.precision import resolve_dtype, torch_dtype


@pytest.mark.parametrize("device,expected", [("cuda", "bfloat16"), ("cuda:1", "bfloat16"), (torch.device("cuda", 0),
                                                                                             "bfloat16"),
                                             ("cpu", "float32"), (torch.device("cpu"), "float32")])
def test_auto_is_bfloat16_on_cuda_and_float32_elsewhere(device, expected):
    assert resolve_dtype("auto", device) == expected


def test_explicit_names_are_kept_and_unknown_ones_refused():
    assert resolve_dtype("float16", "cpu") == "float16" and torch_dtype("float16") is torch.float16
    with pytest.raises(HscrError, match="--dtype must be auto or one of"):
        resolve_dtype("fp8", "cuda")
