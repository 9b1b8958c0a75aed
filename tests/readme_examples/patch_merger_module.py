# Seed README: "Patch Merger" (the module by itself)
import torch
from backbones import PatchMerger

merger = PatchMerger(
    dim = 1024,
    num_tokens_out = 8
)

features = torch.randn(4, 256, 1024)

out = merger(features)
# expect: out.shape == (4, 8, 1024)
