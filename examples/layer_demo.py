"""A fomoe.MoE layer with half of its experts resident, trained for a few steps on CPU."""

import torch

import fomoe

torch.manual_seed(0)
layer = fomoe.MoE(d_model=64, d_ff=128, num_experts=8, top_k=2, resident_experts=[0, 1, 2, 3],
                  aux_loss_coef=0.01, z_loss_coef=1e-3)
target = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
for step in range(51):
    x = torch.randn(32, 16, 64)
    with torch.no_grad():
        y_target = target(x)
    loss = torch.nn.functional.mse_loss(x + layer(x), y_target) + layer.aux_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}  skipped {layer.stats.skipped_fraction.item():.2f}  "
              f"load {[round(v, 2) for v in layer.stats.expert_load.tolist()]}")
