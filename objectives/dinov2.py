"""DINOv2: learning robust visual features without supervision (Oquab et al. 2023, arXiv:2304.07193).

iBOT (objectives/ibot.py, Zhou et al. 2022) with DINOv2's recipe (facebookresearch/dinov2:
dinov2/configs/ssl_default_config.yaml, dinov2/train/ssl_meta_arch.py, dinov2/loss/):

- separate heads for the class token and the patches, 65536 prototypes each (`ibot.separate_head: true` and
  Sinkhorn-Knopp below are the published ViT-L/14 run's, train/vitl14.yaml; the default config shares the head
  and uses the EMA centre);
- Sinkhorn-Knopp teacher targets, 3 iterations (`train.centering: sinkhorn_knopp`, `sinkhorn_knopp_teacher`),
  instead of the EMA centre (`centering="ema"` selects it; the patch centre then runs over masked cells);
- KoLeo on the student's class tokens (before the head) of each global crop, summed over the crops, weight 0.1
  (`dino.koleo_loss_weight`; `koleo_loss(p) for p in student_cls_tokens.chunk(2)`);
- masks: exactly half of the images (`ibot.mask_sample_probability` 0.5) with ratios stratified over
  [0.1, 0.5] (`ibot.mask_ratio_min_max`), blocks of at least 4 cells (`MaskingGenerator`);
- teacher temperature 0.04 -> 0.07 over 30 % of the run for both losses (`teacher.warmup_teacher_temp`,
  `teacher_temp`, `warmup_teacher_temp_epochs` 30 of 100), teacher momentum 0.992 -> 1 (`momentum_teacher`),
  crops (0.32, 1) and 8 local crops of (0.05, 0.32) (`crops.*`).

Stochastic depth is the backbone's (`backbone_args.drop_path`, ViT-L 0.3 in the default config, applied
uniformly; the teacher runs in eval mode without it); layer-scale likewise (`backbone_args.layer_scale`, 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ssl_vit import register_objective

from .ibot import IBOT

__all__ = ["DINOv2"]


class DINOv2(IBOT):
    """DINOv2 over any backbone with `mask_token`: iBOT's arguments (see `IBOT`, `Dino`) with DINOv2's
    defaults: `num_classes_K` = `patch_prototypes` 65536, `shared_head` False, `centering`
    "sinkhorn_knopp" (3 iterations), `koleo_weight` 0.1, `mask_sampling` "stratified", `min_block_cells` 4,
    `patch_center_over` "masked", `moving_average_decay` 0.992, `global_lower_crop_scale` 0.32,
    `local_upper_crop_scale` 0.32, `num_local_crops` 8. `collapse_loss()` is ln K."""

    def __init__(self, net: nn.Module, image_size: int | Sequence[int] | None = 224, *,
                 num_classes_K: int = 65536, patch_prototypes: int | None = 65536, shared_head: bool = False,
                 centering: str = "sinkhorn_knopp", koleo_weight: float = 0.1, mask_sampling: str = "stratified",
                 min_block_cells: int | None = 4, patch_center_over: str = "masked",
                 moving_average_decay: float = 0.992, global_lower_crop_scale: float = 0.32,
                 local_upper_crop_scale: float = 0.32, num_local_crops: int = 8, **ibot_args) -> None:
        super().__init__(net, image_size, num_classes_K=num_classes_K, patch_prototypes=patch_prototypes,
                         shared_head=shared_head, centering=centering, koleo_weight=koleo_weight,
                         mask_sampling=mask_sampling, min_block_cells=min_block_cells,
                         patch_center_over=patch_center_over, moving_average_decay=moving_average_decay,
                         global_lower_crop_scale=global_lower_crop_scale,
                         local_upper_crop_scale=local_upper_crop_scale, num_local_crops=num_local_crops,
                         **ibot_args)


register_objective("dinov2", DINOv2)
