"""v1..vM of the identifier: an RQ-VAE on the K-Means residual r = x - centroid[k].

MLP encoder (512-256-128, ELU) -> latent z (64-d) -> residual quantiser with M codebooks of C codes
(vector-quantize-pytorch ResidualVQ) -> symmetric MLP decoder -> r_hat.

loss = ||r - r_hat||^2 + alpha * sum_m ||res_m - sg[e_m]||^2  (commitment, stop-gradient on codes)
The codebook term ||sg[res_m] - e_m||^2 is optimised by exponential moving averages of the
assigned residuals (the VQ-VAE paper's EMA variant), which is what ResidualVQ does by default.
Against codebook collapse: each codebook is k-means initialised on the first (large) batch, and
codes whose EMA usage falls below ``dead_code_threshold`` are replaced by random batch residuals.
Gradients pass the quantiser straight-through (rotation trick off).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from vector_quantize_pytorch import ResidualVQ

from .config import IdentifierConfig


def auto_threads(work_per_step: float) -> int:
    """1 thread for small steps (where OpenMP threads only add overhead - and on a busy CPU can
    make a step 100x slower), 0 = leave the torch / BLAS default for big ones."""
    return 1 if work_per_step < 5e7 else 0


@contextlib.contextmanager
def thread_limit(n: int):
    """Cap torch and BLAS/OpenMP threads to ``n`` inside the block (n <= 0: no change)."""
    if n <= 0:
        yield
        return
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Encoder -> ResidualVQ -> decoder over (scaled) K-Means residuals."""

    def __init__(self, *, input_dim: int, config: IdentifierConfig):
        super().__init__()
        self.input_dim = input_dim
        dims = [input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = mlp(dims)
        self.decoder = mlp(dims[::-1])
        self.quantizer = ResidualVQ(
            dim=config.latent_dim, num_quantizers=config.M, codebook_size=config.codebook_size,
            kmeans_init=True, kmeans_iters=config.codebook_kmeans_iters, decay=config.ema_decay,
            threshold_ema_dead_code=config.dead_code_threshold, commitment_weight=config.alpha,
            rotation_trick=False,
            # identifiers are fitted by one process; without this the library syncs codebooks
            # whenever a process group exists and a fit inside a multi-process job deadlocks
            sync_codebook=False)
        # residuals are divided by this before the encoder (set from data in fit_rqvae)
        self.register_buffer("input_scale", torch.ones(()))

    def forward(self, r: torch.Tensor):
        """r (B, D) -> r_hat (B, D), codes (B, M), recon loss, weighted commitment loss."""
        x = r / self.input_scale
        z = self.encoder(x)                                  # (B, latent)
        zq, codes, commit = self.quantizer(z)                # (B, latent), (B, M), (M,)
        x_hat = self.decoder(zq)                             # (B, D)
        recon = ((x_hat - x) ** 2).mean()
        return x_hat * self.input_scale, codes, recon, commit.sum()

    @torch.no_grad()
    def encode(self, r: torch.Tensor) -> torch.Tensor:
        """r (B, D) -> codes (B, M), deterministic (eval mode, no codebook updates)."""
        was = self.training
        self.eval()
        _, codes, _ = self.quantizer(self.encoder(r / self.input_scale))
        self.train(was)
        return codes

    @torch.no_grad()
    def reconstruct(self, r: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        zq, _, _ = self.quantizer(self.encoder(r / self.input_scale))
        out = self.decoder(zq) * self.input_scale
        self.train(was)
        return out

    @property
    def codebooks(self) -> list[np.ndarray]:
        """M arrays (C, latent_dim)."""
        return [cb.detach().cpu().numpy().astype(np.float32) for cb in self.quantizer.codebooks]


def fit_rqvae(residuals: np.ndarray, config: IdentifierConfig, *, device: str = "cpu",
              progress: bool = True) -> tuple[RQVAE, dict]:
    """Train on (n, D) residuals for at most ``rqvae_max_steps`` steps; returns (model, history)."""
    params = sum(a * b for a, b in zip([residuals.shape[1], *config.hidden_dims, config.latent_dim],
                                       [*config.hidden_dims, config.latent_dim]))
    work = min(config.rqvae_batch_size, residuals.shape[0]) * params
    with thread_limit(config.num_threads or auto_threads(work)):
        return _fit_rqvae(residuals, config, device=device, progress=progress)


def _fit_rqvae(residuals: np.ndarray, config: IdentifierConfig, *, device: str, progress: bool):
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    n, D = residuals.shape
    model = RQVAE(input_dim=D, config=config).to(device)
    r_all = torch.from_numpy(np.ascontiguousarray(residuals, dtype=np.float32))
    model.input_scale.fill_(float(r_all.pow(2).mean().sqrt().clamp_min(1e-12)))
    batch = min(config.rqvae_batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = min(config.rqvae_max_steps, config.rqvae_epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=config.rqvae_lr, weight_decay=config.rqvae_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=config.rqvae_lr * 0.05)
    model.train()
    # k-means init of the codebooks on a large first batch (ResidualVQ inits on its first forward)
    init_idx = torch.randperm(n, generator=gen)[: min(n, max(16 * config.codebook_size, batch))]
    with torch.no_grad():
        model(r_all[init_idx].to(device))
    history = {"steps": total, "loss": [], "recon": [], "commit": []}
    t0 = time.time()
    bar = tqdm(total=total, desc="rq-vae", disable=not progress, leave=False)
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1, batch):
            r = r_all[perm[s:s + batch]].to(device)
            _, _, recon, commit = model(r)
            loss = recon + commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == total:
                history["loss"].append(float(loss.detach()))
                history["recon"].append(float(recon.detach()))
                history["commit"].append(float(commit.detach()))
                bar.set_postfix(recon=f"{history['recon'][-1]:.4f}", commit=f"{history['commit'][-1]:.4f}")
            bar.update(1)
            if step >= total:
                break
    bar.close()
    history["seconds"] = time.time() - t0
    model.eval()
    return model, history
