"""The matplotlib pictures of launch.visualize: curves panels, reconstructions in pixel space, attention grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ssl_vit
from launch.errors import LaunchError
from launch.knn import IMAGENET_MEAN, IMAGENET_STD, normalizer
from launch.visualize import attention_figure, curves_figure, ema, metric_panels, reconstruction_figure


class PerfectReconstruction(nn.Module):
    """A stand-in MAE that predicts every hidden patch exactly: its reconstruction is its input."""

    can_reconstruct = True

    def __init__(self, patch: int = 8) -> None:
        super().__init__()
        self.patch = patch

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        mask = torch.zeros(x.shape[0], h, w, dtype=torch.bool)
        mask[:, ::2] = True
        hidden = mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2).unsqueeze(1)
        return x.masked_fill(hidden, 0.0), x.clone(), mask


def _grey_digits(batch: int = 3, size: int = 32) -> torch.Tensor:
    """Grey images (R == G == B) with structure: bars of several grey levels."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (batch, 1, size // 4, size // 4), generator=g, dtype=torch.uint8)
    grey = levels.repeat_interleave(4, 2).repeat_interleave(4, 3)
    return grey.expand(batch, 3, size, size).contiguous()


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _not_blank(pixels: np.ndarray) -> None:
    grey = pixels.mean(-1)
    assert grey.std() > 10, "the figure is (nearly) blank"
    assert (grey < 250).mean() > 0.1, "the figure is mostly white"


@pytest.mark.parametrize("norm", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_grey_reconstruction_stays_grey(norm):
    """A perfect model's reconstruction of a grey image is grey everywhere in the figure (R == G == B)
    whatever the normalisation, and shows the image, not a blank."""
    mean, std = norm
    fig = reconstruction_figure(PerfectReconstruction(), _grey_digits(), normalizer(mean, std, 32), mean, std)
    pixels = _rgb(fig)
    _not_blank(pixels)
    tint = np.abs(pixels[..., 0] - pixels[..., 2]).max(), np.abs(pixels[..., 0] - pixels[..., 1]).max()
    assert max(tint) <= 3, f"grey came out tinted: max |R-B|, |R-G| = {tint}"


def test_wrong_statistics_tint_a_grey_image():
    """The test above can fail: un-normalising with other statistics than the input's tints grey."""
    prepare = normalizer(IMAGENET_MEAN, IMAGENET_STD, 32)
    fig = reconstruction_figure(PerfectReconstruction(), _grey_digits(), prepare, (0.5,) * 3, (0.5,) * 3)
    pixels = _rgb(fig)
    assert (pixels[..., 2] - pixels[..., 0]).max() > 20  # blue above red: the tint this figure must avoid


def test_mae_reconstruction_of_flat_grey_patches():
    """A real (untrained) MAE with norm_pix_loss: patches of one grey level come back that grey level,
    since each hidden patch is un-normalised with its own mean and variance."""
    backbone = ssl_vit.create_backbone("vit_tiny")
    objective = ssl_vit.create_objective("mae", backbone, decoder_dim=32, decoder_depth=1)
    assert objective.norm_pix_loss  # the per-patch normalised target, un-normalised by reconstruct()
    unit = objective.unit[-1]
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 256, (2, 1, 32 // unit, 32 // unit), generator=g, dtype=torch.uint8)
    images = levels.repeat_interleave(unit, 2).repeat_interleave(unit, 3).expand(2, 3, 32, 32).contiguous()
    fig = reconstruction_figure(objective, images, normalizer((0.5,) * 3, (0.5,) * 3, 32), (0.5,) * 3, (0.5,) * 3)
    pixels = _rgb(fig)
    _not_blank(pixels)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 3


def test_reconstruction_needs_matching_channels():
    with pytest.raises(LaunchError, match="data.mean/std"):
        reconstruction_figure(PerfectReconstruction(), _grey_digits(), normalizer(), (0.5, 0.5), (0.5, 0.5))


def _records(steps: int = 200, dino: bool = False) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        r = {"step": s, "time": 1.0 * s, "train/loss": 10.0 * math.exp(-s / 40) + 0.05 * (s % 3),
             "train/lr": 1e-3 * min(1.0, s / 20), "train/weight_decay": 0.04 + 0.0002 * s,
             "train/images_per_s": 500.0 + (s % 7)}
        if dino:
            r |= {"train/teacher_entropy": 4.0 - s / 100, "train/kl_to_uniform": s / 100}
        if s % 50 == 0:
            r["val/loss"] = 9.0 * math.exp(-s / 40)
            r["val/knn_top1"] = 10.0 + s / 10
        out.append(r)
    return out


def test_metric_panels_group_by_family():
    panels = metric_panels(_records(dino=True) + [{"step": 1, "train/loss": float("nan")}, {"no": "step"}])
    assert set(panels) == {"loss", "learning rate and weight decay", "throughput", "k-NN accuracy", "teacher collapse"}
    assert set(panels["loss"]) == {"train/loss", "val/loss"}
    assert set(panels["teacher collapse"]) == {"train/teacher_entropy", "train/kl_to_uniform"}
    assert np.isfinite(panels["loss"]["train/loss"][1]).all()
    assert "teacher collapse" not in metric_panels(_records())


def test_ema_smooths_and_is_bias_corrected():
    values = np.array([1.0, 1.0, 1.0, 5.0, 1.0, 1.0])
    smooth = ema(values, 0.6)
    assert smooth[0] == 1.0 and np.allclose(ema(values, 0.0), values)
    assert smooth.max() < 5.0 and np.diff(smooth).std() < np.diff(values).std()


def test_curves_figure_draws_every_panel():
    """Five panels (DINO run) draw lines in several colours; fewer families, a smaller figure."""
    dino = _rgb(curves_figure(_records(dino=True)))
    plain = _rgb(curves_figure(_records()))
    assert dino.shape[0] > plain.shape[0]  # a third row of panels for the collapse metrics
    for pixels in (dino, plain):
        assert (pixels.mean(-1) < 250).mean() > 0.02
        coloured = (pixels.max(-1) - pixels.min(-1)) > 60
        assert coloured.mean() > 0.002, "no coloured curves"
    empty = _rgb(curves_figure([]))
    assert (empty.mean(-1) < 250).mean() > 0.0005  # says so in words


def test_attention_figure_shows_maps():
    backbone = ssl_vit.create_backbone("vit_tiny").eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pixels = _rgb(attention_figure(backbone, images, normalizer(size=32)))
    _not_blank(pixels)
    rows = pixels.shape[0]
    top, bottom = pixels[: rows // 2], pixels[rows // 2:]
    assert np.abs(top[: bottom.shape[0]] - bottom[: top.shape[0]]).mean() > 5  # two images, two different rows


def test_log_images_writes_both_figures():
    """The launcher's pictures hook: HWC uint8 arrays with content under images/attention and images/reconstruction."""
    from launch.visualize import log_images

    class Writer:
        def __init__(self) -> None:
            self.images: dict[str, np.ndarray] = {}

        def add_image(self, tag: str, array: np.ndarray, step: int, dataformats: str) -> None:
            assert dataformats == "HWC" and step == 7
            self.images[tag] = array

    writer = Writer()
    mean, std = (0.5,) * 3, (0.5,) * 3
    log_images(writer, 7, backbone=ssl_vit.create_backbone("vit_tiny").eval(), images=_grey_digits(2),
               prepare=normalizer(mean, std, 32), objective=PerfectReconstruction(), mean=mean, std=std)
    assert set(writer.images) == {"images/attention", "images/reconstruction"}
    for array in writer.images.values():
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3
        _not_blank(array.astype(np.int16))


# ---- attention with and without registers (issue #17) ----------------------------------------------------
def _register_pair(registers: int = 4) -> tuple[ssl_vit.Backbone, ssl_vit.Backbone]:
    """vit_tiny without registers and the same weights with `registers` register tokens (drawn N(0, 1)): whatever
    differs between their maps is what the registers do."""
    torch.manual_seed(0)
    without = ssl_vit.create_backbone("vit_tiny").eval()
    with_registers = ssl_vit.create_backbone("vit_tiny", num_registers=registers).eval()
    assert with_registers.load_state_dict(without.state_dict(), strict=False).missing_keys == ["reg_token"]
    with torch.no_grad():
        with_registers.reg_token.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
    return with_registers, without


def _panel(pixels: np.ndarray, column: int, columns: int = 5) -> np.ndarray:
    """The inner part of column `column` of a grid figure (left 0.01, right 0.99, wspace 0.05), below the titles."""
    width = pixels.shape[1]
    axis = 0.98 * width / (columns + 0.05 * (columns - 1))
    left = 0.01 * width + column * 1.05 * axis
    start, span = int(left + 0.15 * axis), int(0.7 * axis)
    return pixels[int(0.2 * pixels.shape[0]):, start:start + span]


def test_registers_figure_shows_two_different_maps():
    """The maps of the backbone with registers and of the one without are pictures (not blank) and differ from
    each other, in the numbers and in the figure; the registers take a share of the class token's attention."""
    from launch.visualize import attention_maps, register_share, registers_figure

    with_registers, without = _register_pair()
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    prepare = normalizer(size=32)
    x = prepare(images)
    (maps_with, what_with), (maps_without, what_without) = attention_maps(with_registers, x), attention_maps(without, x)
    assert what_with == what_without == "class token" and maps_with.shape == maps_without.shape == (2, 2, 4, 4)
    assert (maps_with - maps_without).abs().max() > 0.1
    share = register_share(with_registers, x)
    assert share.shape == (2,) and ((share > 0.01) & (share < 1)).all(), share
    assert torch.equal(register_share(without, x), torch.zeros(2))

    pixels = _rgb(registers_figure(with_registers, without, images, prepare))
    _not_blank(pixels)
    map_without, map_with = _panel(pixels, 2), _panel(pixels, 4)
    for panel in (map_without, map_with):
        assert panel.mean(-1).std() > 10, "an attention map is (nearly) blank"
        assert ((panel.max(-1) - panel.min(-1)) > 60).mean() > 0.3, "an attention map is not in colour"
    assert np.abs(map_with - map_without).mean() > 5, "the maps with and without registers look the same"
    with pytest.raises(LaunchError, match="one backbone with registers and one without"):
        registers_figure(without, without, images, prepare)


def test_visualize_command_compares_registers(tmp_path):
    """`python -m launch.visualize EXPORT --registers-vs OTHER` writes registers.png, whichever of the two has the
    registers; two backbones without registers are one line and exit 2."""
    from launch.visualize import main

    with_registers, without = _register_pair()
    a = ssl_vit.save_backbone(with_registers, tmp_path / "with", config={"data": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    b = ssl_vit.save_backbone(without, tmp_path / "without", config={"data": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    cache = str(tmp_path / "cache")
    for first, second in ((a, b), (b, a)):
        out = tmp_path / f"out_{first.name}"
        assert main([str(first), "--registers-vs", str(second), "--images", "2", "--cache", cache,
                     "--out", str(out)]) == 0
        with Image.open(out / "registers.png") as img:
            _not_blank(_rgb(img))
        assert (out / "attention.png").is_file()
    assert main([str(b), "--registers-vs", str(b), "--cache", cache, "--out", str(tmp_path / "bad")]) == 2


def test_report_shows_registers_next_to_none(tmp_path):
    """`python -m launch.report EXPORT --registers-vs OTHER` adds the registers section with its picture."""
    import base64
    import io
    import re

    from launch.report import main as report_main

    with_registers, without = _register_pair()
    config = {"data": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    a = ssl_vit.save_backbone(with_registers, tmp_path / "with", config=config)
    b = ssl_vit.save_backbone(without, tmp_path / "without", config=config)
    page_file = tmp_path / "report.html"
    assert report_main([str(a), "--registers-vs", str(b), "--images", "2", "--cache", str(tmp_path / "cache"),
                        "--out", str(page_file)]) == 0
    page = page_file.read_text()
    section = page.split('<section id="registers">', 1)[1].split("</section>", 1)[0]
    assert "<h2>Attention with and without registers</h2>" in section
    (src,) = re.findall(r'src="data:image/png;base64,([^"]*)"', section)
    with Image.open(io.BytesIO(base64.b64decode(src))) as img:
        _not_blank(_rgb(img))
    plain = tmp_path / "plain.html"
    assert report_main([str(a), "--images", "2", "--cache", str(tmp_path / "cache"), "--out", str(plain)]) == 0
    assert 'id="registers"' not in plain.read_text()
