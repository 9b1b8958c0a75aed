# Seed README: "Simple Masked Image Modeling" (SimMIM)
import torch
from backbones import ViT
from objectives import SimMIM

v = ViT(
    image_size = 256,
    patch_size = 32,
    num_classes = 1000,
    dim = 1024,
    depth = 6,
    heads = 8,
    mlp_dim = 2048
)

mim = SimMIM(
    encoder = v,
    masking_ratio = 0.5
)

images = torch.randn(8, 3, 256, 256)

loss = mim(images)
loss.backward()

torch.save(v.state_dict(), './trained-vit.pt')
# expect: loss.dim() == 0 and bool(torch.isfinite(loss))
