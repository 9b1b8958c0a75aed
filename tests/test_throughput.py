"""launch.throughput: FLOP counts against an analytic count, no side effects, peaks, MFU and memory."""

from __future__ import annotations

import math

import pytest
import torch

import ssl_vit
from launch import throughput
from launch.throughput import (
    Throughput,
    count_step_flops,
    measured_matmul_peak,
    peak_flops,
    peak_memory_bytes,
)
from ssl_vit import Objective, ViewSpec


class PooledSquare(Objective):
    """The smallest objective: mean square of the pooled features of one view."""

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec("x", 1, tuple(self.backbone.default_size))]

    def __init__(self, backbone) -> None:
        super().__init__(backbone)
        self.backbone = backbone

    def forward(self, views) -> torch.Tensor:
        loss = self.backbone.forward_features(views[0]).pooled.square().mean()
        self.metrics = {"loss": float(loss.detach())}
        return loss


def analytic_vit_step_flops(batch: int, image: int, patch: int, dim: int, depth: int, heads: int, dim_head: int,
                            mlp: int, prefix: int, channels: int = 3) -> int:
    """2 FLOPs per multiply-add. Forward: patch projection, and per block qkv, q@k, attn@v, output
    projection and the two MLP layers. Backward: two products per linear layer (input and weight
    gradients) but only the weight gradient of the patch projection (the images need no gradient);
    attention: dQ, dK, dV, dP and the recomputed scores of the fused kernel (5 products)."""
    n = (image // patch) ** 2
    t = n + prefix
    inner = heads * dim_head
    embed = 2 * batch * n * channels * patch * patch * dim
    linear = 2 * batch * t * (dim * 3 * inner + inner * dim + dim * mlp + mlp * dim)
    attn_product = 2 * batch * heads * t * t * dim_head
    forward = embed + depth * (linear + 2 * attn_product)
    backward = embed + depth * (2 * linear + 5 * attn_product)
    return forward + backward


def test_flops_of_a_tiny_vit_step_match_the_analytic_count():
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=4, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128)
    backbone = ssl_vit.create_backbone("vit_tiny", **cfg)
    objective = PooledSquare(backbone).train()
    batch = 4
    views = [torch.randn(batch, 3, 32, 32)]
    counted = count_step_flops(objective, views)
    prefix = backbone.num_prefix_tokens
    expected = analytic_vit_step_flops(batch, 32, 4, 64, 2, 2, 32, 128, prefix)
    assert counted == pytest.approx(expected, rel=0.03), (counted, expected)
    # a larger batch doubles every product
    assert count_step_flops(objective, [torch.randn(2 * batch, 3, 32, 32)]) == pytest.approx(2 * counted, rel=1e-6)


def test_attention_is_counted_on_the_cpu_kernel():
    """Without the CPU flash-attention formulas the count would miss both attention products."""
    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny", image_size=32, patch_size=4)
    objective = PooledSquare(backbone)
    x = [torch.randn(2, 3, 32, 32)]
    with_attention = count_step_flops(objective, x)
    t = 16 + backbone.num_prefix_tokens
    attention = 2 * (2 * 2 * 2 * t * t * 32) + 5 * (2 * 2 * 2 * t * t * 32)  # depth 2, heads 2, dim_head 32
    linear_only = analytic_vit_step_flops(2, 32, 4, 64, 2, 2, 32, 128, backbone.num_prefix_tokens) - attention
    assert with_attention - linear_only == pytest.approx(attention, rel=0.05)


def test_counting_leaves_the_run_untouched():
    """DINO updates its centre in forward; the count restores it, writes no .grad, keeps the RNG."""
    from objectives import Dino

    torch.manual_seed(0)
    backbone = ssl_vit.create_backbone("vit_tiny")
    dino = Dino(backbone, image_size=None, num_classes_K=256, projection_hidden_size=64, bottleneck_dim=32,
                num_local_crops=0).train()
    dino.center.normal_()
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    center = dino.center.clone()
    params = [p.detach().clone() for p in dino.parameters()]
    dino.metrics = {"loss": 1.5}
    rng = torch.random.get_rng_state()
    flops = count_step_flops(dino, views)
    assert flops > 0
    assert torch.equal(dino.center, center)
    assert all(p.grad is None for p in dino.parameters())
    assert all(torch.equal(a, p) for a, p in zip(params, dino.parameters()))
    assert dino.metrics == {"loss": 1.5}
    assert torch.equal(torch.random.get_rng_state(), rng)
    # the student and the teacher forward are counted: more than the student's step alone
    student_only = count_step_flops(PooledSquare(ssl_vit.create_backbone("vit_tiny")), views[:1])
    assert flops > student_only


def test_mfu_is_achieved_over_peak():
    meter = Throughput(torch.device("cpu"), flops_per_step=10 ** 9, peak=1e10)
    meter.update(images=8, seconds=0.5, data_wait=0.1)
    meter.update(images=8, seconds=0.5, data_wait=0.0)
    w = meter.window()
    assert w["images_per_s"] == pytest.approx(16.0)
    assert w["flops_per_s"] == pytest.approx(2e9)
    assert w["mfu"] == pytest.approx(w["flops_per_s"] / 1e10) == pytest.approx(0.2)
    assert w["data_wait"] == pytest.approx(0.1)
    assert w["peak_memory_mb"] > 0
    meter.update(images=4, seconds=2.0)
    assert meter.window()["images_per_s"] == pytest.approx(2.0)  # a new window
    t = meter.totals()
    assert t["steps"] == 3 and t["images_per_s"] == pytest.approx(20 / 3.0)
    assert all(isinstance(v, float) and math.isfinite(v) for v in t.values())
    assert "MFU" in meter.describe()
    assert "mfu" not in Throughput(torch.device("cpu")).totals()


def test_peak_memory_is_positive():
    assert peak_memory_bytes(torch.device("cpu")) > 0


def test_cpu_peak_is_measured_and_cached():
    value, how = peak_flops(torch.device("cpu"), torch.float32)
    assert value > 1e8 and "measured" in how
    assert measured_matmul_peak(torch.device("cpu"), torch.float32) == value


@pytest.mark.parametrize("name, dtype, tera, label", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4, "H100 SXM"),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0, "H100 PCIe"),
    ("NVIDIA H200", torch.float32, 66.9, "H200 SXM"),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.4, "GH200"),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0, "A100"),
    ("NVIDIA A10G", torch.float16, 70.0, "A10G"),
    ("NVIDIA L4", torch.bfloat16, 121.0, "L4"),
    ("NVIDIA L40S", torch.bfloat16, 362.05, "L40S"),
])
def test_gpu_peaks_come_from_the_table(monkeypatch, name, dtype, tera, label):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(throughput, "_tf32_allowed", lambda: False)
    value, how = peak_flops(torch.device("cuda"), dtype)
    assert value == pytest.approx(tera * 1e12) and how.startswith(label)


def test_tf32_column_when_torch_allows_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(throughput, "_tf32_allowed", lambda: True)
    value, how = peak_flops(torch.device("cuda"), torch.float32)
    assert value == pytest.approx(494.7e12) and "tf32" in how
