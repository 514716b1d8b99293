"""toy's training phases (:func:`train_clip`, :func:`train_vae`, :func:`train_vae_refine`, :func:`encode_latents`,
:func:`train_unet`), each a pure loop over the models passed in, its every step's randomness from ``(seed, phase,
step)``; :func:`brainldm.offline.toy.train_toy` checkpoints them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from brainldm.images import pictures_to_tensor
from brainldm.offline.toy_parts import ToyConfig, lr_at, resize, step_generator, to_unit

# --- training phases ---------------------------------------------------------------------------------------
# Each takes its model and optimizer, runs steps [start, stop) and calls ``checkpoint(step)`` every
# ``every`` steps; the caller owns saving, so the loops stay free of file handling.


def _descend(optimizer, loss: torch.Tensor, lr: float, clip_params=None) -> None:
    """One optimiser step on ``loss`` at learning rate ``lr``; gradients of ``clip_params`` clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()


@dataclass
class Stage:
    """One training stage's bookkeeping: its optimizer, the step it starts (or resumes) from, the device, and what it
    calls on the way: ``checkpoint(step, loss)`` every ``every`` steps and after the last, and a progress bar."""

    optimizer: torch.optim.Optimizer
    config: ToyConfig
    device: torch.device
    start: int = 0
    checkpoint: Callable[[int, float], None] = lambda step, loss: None
    every: int = 250
    progress: Any = None

    def report(self, step: int, steps: int, loss: float, digits: int = 4) -> None:
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.{digits}f}")
        if (step + 1) % self.every == 0 or step + 1 == steps:
            self.checkpoint(step + 1, loss)


def _caption_index(caption_owner, n_pictures: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(captions per picture, index of each picture's first caption): captions are stored picture by picture."""
    counts = torch.bincount(torch.as_tensor(caption_owner), minlength=n_pictures)
    return counts, torch.cumsum(counts, 0) - counts


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_clip(clip, token_ids, caption_owner, pictures, stage: Stage) -> None:
    """Contrastive (InfoNCE) training on (picture, one of its captions). ``token_ids``: (n_captions, 77);
    ``caption_owner``: (n_captions,) picture index of each; ``pictures``: uint8 at the vision tower's size."""
    config, device = stage.config, stage.device
    counts, first = _caption_index(caption_owner, len(pictures))
    clip.train()
    for step in range(stage.start, config.clip_steps):
        g = step_generator(config.seed, "clip", step)
        items = torch.randperm(len(pictures), generator=g)[: config.clip_batch]
        captions = first[items] + torch.randint(0, 1 << 30, (len(items),), generator=g) % counts[items]
        out = clip(
            input_ids=token_ids[captions].to(device),
            pixel_values=pictures_to_tensor(torch.from_numpy(pictures[items.numpy()]), "clip").to(device),
            return_loss=True,
        )
        _descend(stage.optimizer, out.loss, lr_at(step, config.clip_steps, config.clip_lr))
        stage.report(step, config.clip_steps, out.loss.item(), digits=3)
    clip.eval()


def _vae_crops(pictures: np.ndarray, small: np.ndarray, config: ToyConfig, g: torch.Generator, step: int):
    """A batch of ``vae_crop`` crops in [-1, 1], from the pictures at the output size on even steps and at z's size on
    odd ones."""
    source = small if step % 2 else pictures
    items = torch.randint(0, len(source), (config.vae_batch,), generator=g).numpy()
    y0, x0 = torch.randint(0, source.shape[1] - config.vae_crop + 1, (2,), generator=g).tolist()
    return to_unit(source[items, y0 : y0 + config.vae_crop, x0 : x0 + config.vae_crop])


def _vae_loss(vae, x: torch.Tensor, config: ToyConfig, g: torch.Generator):
    """(L1 + MSE of a round trip through a posterior sample + ``vae_kl`` x KL, the posterior) for a batch ``x``."""
    posterior = vae.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=g).to(x.device)
    recon = vae.decode(posterior.mean + posterior.std * eps).sample
    return F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.vae_kl * posterior.kl().mean(), posterior


def _vae_batch(pictures, small, config: ToyConfig, phase: str, step: int, device):
    """(the step's generator, its batch of crops on ``device``): the same for a phase's step whenever it runs."""
    g = step_generator(config.seed, phase, step)
    return g, _vae_crops(pictures, small, config, g, step).to(device)


def train_vae(vae, pictures, stage: Stage) -> None:
    """Reconstruction training on random crops of the pictures at the output size and at z's size (5/8 of it),
    so the VAE serves both Xz (decoded from z at 5/8) and img2img (at the output size).
    Loss: L1 + MSE on pixels in [-1, 1], plus a small KL term."""
    config, device = stage.config, stage.device
    small = resize(pictures, config.image_size * 5 // 8)
    vae.train()
    for step in range(stage.start, config.vae_steps):
        g, x = _vae_batch(pictures, small, config, "vae", step, device)
        loss, _ = _vae_loss(vae, x, config, g)
        _descend(stage.optimizer, loss, lr_at(step, config.vae_steps, config.vae_lr), vae.parameters())
        stage.report(step, config.vae_steps, loss.item())
    vae.eval()


REFINE_ANCHOR = 0.1  # train_vae_refine: weight of the pull towards the unrefined latents (MSE over their variance)


def train_vae_refine(vae, anchor, pictures, stage: Stage) -> None:
    """:func:`train_vae` again, at ``vae_lr`` / 4, on crops mirrored left-right half the time, plus a pull of the
    latent means towards ``anchor``'s (a frozen copy of the unrefined VAE: ``REFINE_ANCHOR`` x their MSE over their
    variance), so that z, and a U-Net trained on the old latents, move little.

    Why mirrored: the world's snakes' stripes run one diagonal, giraffes' chequerboards both (a chequerboard is two
    crossed diagonal gratings), so a VAE trained on the pictures alone saw the other diagonal only inside
    chequerboards, and did not keep it: a lone grating along it came back from toy's first VAE nearly blank, and
    giraffes as snakes. Mirrored snakes run the other diagonal."""
    config, device = stage.config, stage.device
    small = resize(pictures, config.image_size * 5 // 8)
    vae.train()
    for step in range(stage.start, config.vae_refine_steps):
        g, x = _vae_batch(pictures, small, config, "vae_refine", step, device)
        mirrored = (torch.rand(len(x), generator=g) < 0.5).to(device)[:, None, None, None]
        x = torch.where(mirrored, x.flip(-1), x)
        loss, posterior = _vae_loss(vae, x, config, g)
        with torch.no_grad():
            target = anchor.encode(x).latent_dist.mean
        loss = loss + REFINE_ANCHOR * F.mse_loss(posterior.mean, target) / target.var()
        _descend(stage.optimizer, loss, lr_at(step, config.vae_refine_steps, config.vae_lr / 4), vae.parameters())
        stage.report(step, config.vae_refine_steps, loss.item())
    vae.eval()


@torch.no_grad()
def encode_latents(vae, pictures: np.ndarray, device, batch: int = 64, progress=None) -> torch.Tensor:
    """Unscaled VAE latent means of the pictures at their own size -> (n, 4, size / 8, size / 8) float32 CPU."""
    out = []
    for start in range(0, len(pictures), batch):
        x = to_unit(pictures[start : start + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
        if progress is not None:
            progress.update(len(x))
    return torch.cat(out)


@torch.no_grad()
def encode_text(text_encoder, token_ids: torch.Tensor, device, batch: int = 256, progress=None) -> torch.Tensor:
    """Last hidden states of the text tower for each token row -> (n, 77, hidden), float16 on the CPU."""
    out = []
    for start in range(0, len(token_ids), batch):
        out.append(text_encoder(token_ids[start : start + batch].to(device))[0].half().cpu())
        if progress is not None:
            progress.update(len(out[-1]))
    return torch.cat(out)


def train_unet(unet, ema, latents, caption_states, caption_owner, empty_state, scheduler, stage: Stage) -> None:
    """Noise prediction (epsilon, MSE) on scaled latents (n, 4, h, w), conditioned on the frozen text tower's
    states of the captions (``caption_states``: (n_captions, 77, hidden), computed once; ``caption_owner``: the
    picture of each caption; ``empty_state``: (77, hidden) for "").

    Per item, the condition is the mean over all its captions (what c is) or one of them, each half the time,
    or the empty caption with probability ``caption_dropout`` (so classifier-free guidance works).

    With ``caption_mix`` > 0, each kept condition also moves by lam x (mean_j - mean_k) for two random pictures j and
    k, lam uniform in [0, caption_mix]: a condition off by other pictures' meaning, as a decoded c is (its ridge
    error lies in the span of the training pictures' c), must still draw its own picture.
    """
    config, device = stage.config, stage.device
    owner = torch.as_tensor(caption_owner)
    counts, first = _caption_index(owner, len(latents))
    mean_states = torch.zeros((len(latents), *caption_states.shape[1:]), device=caption_states.device)
    mean_states.index_add_(0, owner.to(caption_states.device), caption_states.float())
    mean_states = (mean_states / counts.to(mean_states.device)[:, None, None]).to(caption_states.dtype)
    empty_state = empty_state.to(device, torch.float32)
    unet.train()
    for step in range(stage.start, config.unet_steps):
        g = step_generator(config.seed, "unet", step)
        items = torch.randint(0, len(latents), (config.unet_batch,), generator=g)
        mode = torch.rand(len(items), generator=g)
        one = first[items] + torch.randint(0, 1 << 30, (len(items),), generator=g) % counts[items]
        single = caption_states[one.to(caption_states.device)].to(device, torch.float32)
        mean = mean_states[items.to(mean_states.device)].to(device, torch.float32)
        use_mean = (mode < 0.5 + config.caption_dropout / 2).to(device)[:, None, None]
        drop = (mode < config.caption_dropout).to(device)[:, None, None]
        cond = torch.where(use_mean, mean, single)
        if config.caption_mix > 0:  # drawn only when on: a run without it draws what earlier toys drew
            j, k = (torch.randint(0, len(latents), (len(items),), generator=g) for _ in range(2))
            lam = (torch.rand(len(items), generator=g) * config.caption_mix).to(device)[:, None, None]
            offset = mean_states[j.to(mean_states.device)] - mean_states[k.to(mean_states.device)]
            cond = cond + lam * offset.to(device, torch.float32)
        cond = torch.where(drop, empty_state, cond)
        x0 = latents[items].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(items),), generator=g).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        _descend(stage.optimizer, loss, lr_at(step, config.unet_steps, config.unet_lr), unet.parameters())
        ema.update(unet)
        stage.report(step, config.unet_steps, loss.item())
    unet.eval()
