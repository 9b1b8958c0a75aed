# Seed README: "Adaptive Token Sampling"
import torch
from backbones import ATSViT as ViT

v = ViT(
    image_size = 256,
    patch_size = 16,
    num_classes = 1000,
    dim = 1024,
    depth = 6,
    max_tokens_per_depth = (256, 128, 64, 32, 16, 8),
    heads = 16,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)

img = torch.randn(4, 3, 256, 256)

preds = v(img)

preds, token_ids = v(img, return_sampled_token_ids = True)
# expect: preds.shape == (4, 1000)
# expect: token_ids.shape[0] == 4 and token_ids.shape[1] <= 8
# expect: bool(((token_ids >= -1) & (token_ids < 256)).all())
