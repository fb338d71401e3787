"""megatron_nsa.compat's foreach stand-ins for the multi-tensor ops of apex and Transformer
Engine: the values of megatron-core's own fallbacks, installed only where those are in use."""

import pytest
import torch
from megatron.core import utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mcore_optimizer

from megatron_nsa import compat


def grads() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape in [(3, 5), (7,), (2, 2, 2), (1,)]]


def test_l2_norm_is_the_norm_of_all_tensors():
    tensors = grads()
    norm, per_tensor = compat._foreach_l2_norm(2048, torch.zeros(1), [tensors], False)
    expected = torch.cat([t.flatten() for t in tensors]).double().norm()
    assert per_tensor is None
    assert norm.dtype == torch.float32 and norm.shape == (1,)
    torch.testing.assert_close(norm.double(), expected.reshape(1), rtol=1e-6, atol=0)


def test_l2_norm_of_bf16_tensors_is_accumulated_in_fp32():
    tensors = [t.to(torch.bfloat16) for t in grads()]
    norm, _ = compat._foreach_l2_norm(2048, torch.zeros(1), [tensors], False)
    expected = torch.cat([t.float().flatten() for t in tensors]).norm()
    torch.testing.assert_close(norm, expected.reshape(1))


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("in_place", [True, False])
def test_scale_writes_src_times_scale_into_dst(scale, in_place):
    src = grads()
    expected = [t * scale for t in src]
    dst = src if in_place else [torch.full_like(t, 7.0) for t in src]
    compat._foreach_scale(2048, torch.zeros(1), [src, dst], scale)
    for got, want in zip(dst, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_installed_in_place_of_megatrons_fallbacks(monkeypatch):
    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    monkeypatch.setattr(mcore_optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    assert compat.use_foreach_multi_tensor_ops()
    assert clip_grads.l2_norm_impl is compat._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is compat._foreach_scale
    assert mcore_optimizer.multi_tensor_scale_impl is compat._foreach_scale


def test_left_alone_when_apex_or_te_provides_them(monkeypatch):
    def fused(*args):
        raise AssertionError("not called")

    monkeypatch.setattr(clip_grads, "l2_norm_impl", fused)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", fused)
    assert not compat.use_foreach_multi_tensor_ops()
    assert clip_grads.l2_norm_impl is fused and clip_grads.multi_tensor_scale_impl is fused
