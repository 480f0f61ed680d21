"""The bf16 output head's native small-batch product."""

import pytest
import torch
from torch import nn

from fourbit.nn.small_batch_linear import SmallBatchLinear, use_small_batch_head
from fourbit.quant import native

pytestmark = pytest.mark.skipif(not native.dense_ok(), reason="needs AVX512_BF16 native kernels")


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17])
def test_small_batch_head_matches_float64(rows):
    torch.manual_seed(rows)
    head = nn.Linear(96, 1000, bias=False).bfloat16()
    head.__class__ = SmallBatchLinear
    x = torch.randn(rows, 96).bfloat16()
    want = x.double() @ head.weight.double().t()
    with torch.inference_mode():
        got = head(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1000)
    assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-2


def test_loaded_head_keeps_its_weight_and_gradients_flow(tiny_llama):
    import fourbit

    model, _ = fourbit.load(tiny_llama, compute_dtype=torch.bfloat16, progress=False)
    head = model.get_output_embeddings()
    assert isinstance(head, SmallBatchLinear)
    assert "lm_head.weight" in model.state_dict()  # the same parameter under the same name
    assert not use_small_batch_head(nn.Module())  # no head: nothing to do
    x = torch.randn(2, head.in_features, dtype=torch.bfloat16, requires_grad=True)
    head(x).float().sum().backward()  # the training path: torch's linear, with gradients
    torch.testing.assert_close(x.grad.float(), head.weight.float().sum(0).expand(2, -1), rtol=2e-2, atol=1e-2)
