# Seed README: "Dino"
import torch
from backbones import ViT
from objectives import Dino

model = ViT(
    image_size = 256,
    patch_size = 32,
    num_classes = 1000,
    dim = 1024,
    depth = 6,
    heads = 8,
    mlp_dim = 2048
)

learner = Dino(
    model,
    image_size = 256,
    hidden_layer = 'to_latent',
    projection_hidden_size = 256,
    projection_layers = 4,
    num_classes_K = 65336,
    student_temp = 0.9,
    teacher_temp = 0.04,
    local_upper_crop_scale = 0.4,
    global_lower_crop_scale = 0.5,
    moving_average_decay = 0.9,
    center_moving_average_decay = 0.9,
)

opt = torch.optim.Adam(learner.parameters(), lr = 3e-4)

def sample_unlabelled_images():
    return torch.randn(20, 3, 256, 256)

for _ in range(100):
    images = sample_unlabelled_images()
    loss = learner(images)
    opt.zero_grad()
    loss.backward()
    opt.step()
    learner.update_moving_average()

torch.save(model.state_dict(), './pretrained-net.pt')
# expect: torch.isfinite(loss).item()
# expect: learner.local_size == (96, 96)
