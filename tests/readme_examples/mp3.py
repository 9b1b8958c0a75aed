# Seed README: "Masked Position Prediction" (MP3)
import torch
from backbones import ViT
from objectives import MP3

v = ViT(
    num_classes = 1000,
    image_size = 256,
    patch_size = 8,
    dim = 1024,
    depth = 6,
    heads = 8,
    mlp_dim = 2048,
    dropout = 0.1,
)

mp3 = MP3(
    vit = v,
    masking_ratio = 0.75
)

images = torch.randn(8, 3, 256, 256)

loss = mp3(images)
loss.backward()


torch.save(v.state_dict(), './trained-vit.pt')
# expect: loss.dim() == 0 and bool(torch.isfinite(loss))
