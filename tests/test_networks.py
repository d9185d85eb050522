"""The DDPM++ U-Net: size, shapes, and per-example gradients through torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpdm.networks import DDPMpp, GroupNorm, build_network, count_parameters, downsample2x, upsample2x


def tiny(num_classes=3, resolution=8, channels=1, attn=(4,)):
    torch.manual_seed(0)
    net = DDPMpp(resolution, channels, num_classes, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=attn)
    # Zero-initialised output layers would make every comparison trivial: randomise.
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


def test_mnist_network_has_the_papers_size():
    # DPDM (Sec. 5 / App. C): 1.75M parameters for MNIST / Fashion-MNIST.
    net = DDPMpp(28, 1, 10)
    n = count_parameters(net)
    assert abs(n - 1.75e6) <= 0.01 * 1.75e6, n
    assert n == 1_753_345  # pins the architecture; change deliberately


def test_no_batchnorm_and_groups_divide_channels():
    net = DDPMpp(28, 1, 10)
    for m in net.modules():
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm)
        if isinstance(m, GroupNorm):
            assert m.weight.numel() % m.num_groups == 0
    assert not list(net.buffers())


def test_build_network_reads_settings():
    settings = {"model": {"channels": 8, "channel_mult": [1, 2, 2], "num_blocks": 1, "attn_resolutions": [8, 16],
                          "dropout": 0.0}}
    net = build_network(settings, 32, 3, 0)
    assert net.map_label is None and net.in_channels == 3
    names = [n for n, m in net.named_modules() if type(m).__name__ == "SelfAttention"]
    assert any("16x16" in n for n in names) and any("8x8" in n for n in names)
    assert not any("32x32" in n for n in names)
    y = net(torch.randn(2, 3, 32, 32), torch.randn(2))
    assert y.shape == (2, 3, 32, 32)


def test_resampling_roundtrip():
    x = torch.randn(2, 3, 6, 4)
    assert torch.equal(downsample2x(upsample2x(x)), x)
    assert torch.allclose(downsample2x(x), nn.functional.avg_pool2d(x, 2))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_forward_shapes(num_classes):
    net = tiny(num_classes)
    x = torch.randn(5, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 1]) if num_classes else None
    y = net(x, torch.randn(5), labels)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_label_matters_and_none_means_null_class():
    net = tiny(3)
    x, t = torch.randn(2, 1, 8, 8), torch.randn(2)
    y0 = net(x, t, torch.tensor([0, 0]))
    y1 = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(y0, y1)
    assert torch.allclose(net(x, t, None), net(x, t, torch.tensor([3, 3])))
    with pytest.raises(ValueError):
        tiny(0)(x, t, torch.tensor([0, 0]))


def test_rows_are_independent():
    # GroupNorm and attention act per row: row 0 must not see row 1.
    net = tiny(3)
    x, t, c = torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([1, 2])
    full = net(x, t, c)
    alone = net(x[:1], t[:1], c[:1])
    assert torch.allclose(full[:1], alone, atol=1e-6)


def test_vmap_functional_call_and_per_example_grads():
    # The privacy helper's call pattern: vmap over examples, each example a batch of K copies.
    net = tiny(3)
    params = {k: v.detach() for k, v in net.named_parameters()}
    B, K = 3, 2
    torch.manual_seed(1)
    x, t, c = torch.randn(B, K, 1, 8, 8), torch.randn(B, K), torch.tensor([0, 3, 2])

    def f(p, xb, tb, cb):
        return functional_call(net, p, (xb, tb, cb.expand(tb.shape[0])))

    out = vmap(f, in_dims=(None, 0, 0, 0))(params, x, t, c)
    ref = net(x.flatten(0, 1), t.flatten(), c.repeat_interleave(K)).reshape(out.shape)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    def loss(p, xb, tb, cb):
        return (f(p, xb, tb, cb) ** 2).mean()

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, t, c)
    for b in range(B):
        net.zero_grad()
        (net(x[b], t[b], c[b].expand(K)) ** 2).mean().backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name][b], p.grad, atol=1e-5, rtol=1e-4)


def test_bad_resolution_is_rejected():
    with pytest.raises(ValueError):
        DDPMpp(10, 1, 0, channel_mult=(1, 2, 2))
