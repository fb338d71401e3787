"""The fused elementwise glue of the layers: megatron_nsa.attention.fusion and the norms'
functions of megatron_nsa.norm.

On CPU the functions run as written; these tests check them against independent formulas and
check that each traces as one graph (torch.compile fullgraph, the aot_eager backend: what
inductor would fuse on CUDA) with the same forward and gradients. The `gpu` test compiles
them with inductor on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from megatron_nsa import norm
from megatron_nsa.attention import fusion
from megatron_nsa.config import ASATransformerConfig


def rotate_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention as a complex product: channel pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    w = torch.complex(cos[..., :half].double(), sin[..., :half].double())
    out = z * w
    return torch.cat((out.real, out.imag), dim=-1).to(x.dtype)


def cos_sin(length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    theta = torch.rand(length, 1, 1, dim // 2, dtype=torch.float64) * 6.0
    theta = torch.cat((theta, theta), dim=-1)
    return theta.cos().float(), theta.sin().float()


def inputs(fn_name: str, dtype=torch.float32, device="cpu") -> tuple:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    s, b, heads, d, d_r = 7, 2, 6, 5, 4
    cos, sin = (t.to(device) for t in cos_sin(s, d_r))
    if fn_name == "rope_cat":
        return rand(s, b, heads, d), rand(s, b, 1, d_r), cos, sin
    if fn_name == "rotate":
        return rand(s, b, heads, d_r + 2), cos, sin
    if fn_name == "rope_tail":
        return rand(s, b, heads, d + d_r), cos, sin
    if fn_name == "rope_kv":
        return rand(s, b, heads, d + 3), rand(s, b, 1, d_r), cos, sin, d
    if fn_name == "group_kv":
        kv = rand(3, b, s, 2, d + 3).permute(1, 2, 0, 3, 4)  # strided, as einsum returns it
        return kv, rand(b, s, 3, d_r), d
    if fn_name == "group_cat":
        return rand(b, s, heads, d), rand(b, s, 3, d_r)
    if fn_name == "rms_norm":
        return rand(s, b, 3, d), rand(3, d) + 1.0, 1e-5
    if fn_name == "layer_norm":
        return rand(s, b, d) * 3.0 + 1.0, rand(d) + 1.0, rand(d), 1e-5
    return torch.sigmoid(rand(b, s, heads, 2)), rand(b, s, heads, d), rand(b, s, heads, d)


FUNCTIONS = {
    "rope_cat": fusion.rope_cat,
    "rope_tail": fusion.rope_tail,
    "rotate": fusion.rotate,
    "group_cat": fusion.group_cat,
    "rope_kv": fusion.rope_kv,
    "group_kv": fusion.group_kv,
    "gated_sum": fusion.gated_sum,
    "rms_norm": norm.rms_norm,
    "layer_norm": norm.layer_norm,
}


def test_rope_cat_rotates_the_shared_part_for_every_head():
    nope, rope, cos, sin = inputs("rope_cat")
    out = fusion.rope_cat(nope, rope, cos, sin)
    assert out.shape == (*nope.shape[:-1], nope.shape[-1] + rope.shape[-1])
    torch.testing.assert_close(out[..., : nope.shape[-1]], nope, rtol=0, atol=0)
    expected = rotate_complex(rope, cos, sin).expand(*nope.shape[:-1], -1)
    torch.testing.assert_close(out[..., nope.shape[-1]:], expected)


def test_rope_tail_rotates_the_last_channels_of_every_head():
    x, cos, sin = inputs("rope_tail")
    d_r = cos.shape[-1]
    out = fusion.rope_tail(x, cos, sin)
    torch.testing.assert_close(out[..., :-d_r], x[..., :-d_r], rtol=0, atol=0)
    torch.testing.assert_close(out[..., -d_r:], rotate_complex(x[..., -d_r:], cos, sin))


def test_rope_kv_splits_keys_from_values_and_rotates_the_shared_part():
    kv, rope, cos, sin, d = inputs("rope_kv")
    key, value = fusion.rope_kv(kv, rope, cos, sin, d)
    torch.testing.assert_close(key, fusion.rope_cat(kv[..., :d], rope, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(value, kv[..., d:], rtol=0, atol=0)
    assert value.is_contiguous()


def test_group_kv_gives_each_head_its_key_value_and_groups_part():
    kv, shared, d = inputs("group_kv")
    key, value = fusion.group_kv(kv, shared, d)
    per_group = kv.shape[3]
    for h in range(kv.shape[2] * per_group):
        j, i = divmod(h, per_group)
        expected = torch.cat((kv[:, :, j, i, :d], shared[:, :, j]), dim=-1)
        torch.testing.assert_close(key[:, :, h], expected, rtol=0, atol=0)
        torch.testing.assert_close(value[:, :, h], kv[:, :, j, i, d:], rtol=0, atol=0)
    assert value.is_contiguous()


def test_rotate_leaves_channels_past_the_rope_dim():
    x, cos, sin = inputs("rotate")
    d_r = cos.shape[-1]
    out = fusion.rotate(x, cos, sin)
    torch.testing.assert_close(out[..., :d_r], rotate_complex(x[..., :d_r], cos, sin))
    torch.testing.assert_close(out[..., d_r:], x[..., d_r:], rtol=0, atol=0)


def test_group_cat_gives_each_head_its_groups_part():
    nope, shared = inputs("group_cat")
    groups = shared.shape[2]
    per_group = nope.shape[2] // groups
    out = fusion.group_cat(nope, shared)
    for h in range(nope.shape[2]):
        expected = torch.cat((nope[:, :, h], shared[:, :, h // per_group]), dim=-1)
        torch.testing.assert_close(out[:, :, h], expected, rtol=0, atol=0)


def rms_norm_float64(x, weight, eps):
    x = x.double()
    return x / x.pow(2).mean(-1, keepdim=True).add(eps).sqrt() * weight.double()


def layer_norm_float64(x, weight, bias, eps):
    centred = x.double() - x.double().mean(-1, keepdim=True)
    std = centred.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return centred / std * weight.double() + bias.double()


def test_norms_and_gated_sum_match_their_formulas():
    x, weight, eps = inputs("rms_norm")
    expected = rms_norm_float64(x, weight, eps).float()
    torch.testing.assert_close(norm.rms_norm(x, weight, eps), expected)
    x, weight, bias, eps = inputs("layer_norm")
    expected = layer_norm_float64(x, weight, bias, eps).float()
    torch.testing.assert_close(norm.layer_norm(x, weight, bias, eps), expected)
    gates, o_cmp, o_slc = inputs("gated_sum")
    expected = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc
    torch.testing.assert_close(fusion.gated_sum(gates, o_cmp, o_slc), expected)


def test_fuse_on_cpu_runs_the_plain_function():
    for name, fn in FUNCTIONS.items():
        args = inputs(name)
        torch.testing.assert_close(fn(*args, fuse=True), fn(*args), rtol=0, atol=0)
        assert fn.compiled is None, name


def forward_and_grads(fn, args: tuple) -> list[torch.Tensor]:
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
              for a in args]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    loss = 0.0
    for out in outs:
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
        loss = loss + (out * weights.view(out.shape)).sum()
    loss.backward()
    return outs + [a.grad for a in leaves if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_each_function_traces_as_one_graph_with_the_same_results(name):
    fn = FUNCTIONS[name].fn
    torch._dynamo.reset()
    traced = torch.compile(fn, backend="aot_eager", fullgraph=True)
    args = inputs(name)
    for got, want in zip(forward_and_grads(traced, args), forward_and_grads(fn, args),
                         strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUNCTIONS)
def test_fused_on_cuda_matches_the_plain_function(name):
    fn = FUNCTIONS[name]
    args = inputs(name, dtype=torch.bfloat16, device="cuda")
    fused = forward_and_grads(lambda *a: fn(*a, fuse=True), args)
    plain = forward_and_grads(fn.fn, args)
    assert fn.compiled is not None
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_norm_module_computes_its_function_in_fp32(normalization):
    config = ASATransformerConfig(
        num_layers=2, hidden_size=8, num_attention_heads=2, normalization=normalization,
        fuse_elementwise=True, use_cpu_initialization=True,
    )
    module = norm.Norm(config=config, hidden_size=8, eps=1e-5)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        if module.bias is not None:
            module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 2, 8, dtype=torch.bfloat16) * 4.0
    if normalization == "RMSNorm":
        expected = rms_norm_float64(x, module.weight, 1e-5)
    else:
        expected = layer_norm_float64(x, module.weight, module.bias, 1e-5)
    out = module(x)
    assert out.dtype == torch.bfloat16 and module.fuse
    torch.testing.assert_close(out.double(), expected.to(torch.bfloat16).double())
