"""memdistill: single-branch instance discrimination with a memory bank (docs/method.md).

Cao and Wu, "On Improving the Algorithm-, Model-, and Data- Efficiency of
Self-Supervised Learning" (arXiv 2404.19289): NPID's memory bank with a calibrated
initialisation, a gradient-corrected bank update, SqrtKL self-distillation and CutMix,
one augmented view per image per step. Every part is a switch in MethodConfig; with
bank_init random, bank_update ema, sqrtkl_weight 0 and cutmix_prob 0 it is NPID.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgessl.augment import cutmix
from edgessl.config import AUTO, MethodConfig
from edgessl.device import full_precision
from edgessl.distributed import all_gather_cat, all_reduce_sum, world
from edgessl.losses import instance_loss, sqrtkl_loss
from edgessl.methods.heads import projection_head


SAMPLE_FROM = 16_384  # negatives "auto": every bank row up to this many images ...
SAMPLED = 4096  # ... and this many sampled beyond (the bank matmul grows with the data, the gain does not:
# measured on Fashion-MNIST, git show 4138b9e:configs/bench/fmnist_search.yaml)


def auto_negatives(n: int):
    """What negatives "auto" means for a bank of n rows: "all" or a sampled count."""
    return "all" if n <= SAMPLE_FROM else SAMPLED


@dataclass
class BankStep:
    """What one forward pass leaves for the bank update that follows the optimizer step."""

    indices: torch.Tensor  # (B,) dataset rows of the batch
    z: torch.Tensor  # (B, d) detached unit embeddings
    cols: Optional[torch.Tensor]  # (C,) scored bank rows, or None for every row
    cosines: torch.Tensor  # (B, C) detached scores against the bank as it was before this step
    targets: torch.Tensor  # (B,) column of each image's own row
    targets_b: Optional[torch.Tensor] = None  # (B,) CutMix partner's column
    perm: Optional[torch.Tensor] = None  # (B,) CutMix partner of each row
    lam: float = 1.0  # CutMix: area fraction that stays the row's own image
    grad: Optional[torch.Tensor] = None  # (C, d) d(batch-summed L_total)/d(scored rows), for `grad`


class MemDistill(nn.Module):
    num_views = 1
    loss_parts = ("loss_id", "loss_sqrtkl")

    def __init__(self, backbone: nn.Module, num_samples: int, cfg: MethodConfig):
        super().__init__()
        if cfg.negatives == AUTO:
            raise ValueError("method.negatives is 'auto': the recipe (edgessl.recipe) resolves it before a run builds")
        self.cfg = cfg
        self.backbone = backbone
        self.head = projection_head(backbone.feature_dim, cfg.head_dims)
        # W: one unit row per training image, indexed by dataset position (NPID's random init)
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, cfg.head_dims[-1]), dim=1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """z = g(f(x)) / ||g(f(x))||: (B, 3, S, S) -> (B, d); the backbone in the step's precision,
        the head g in fp32."""
        features = self.backbone(images)
        with full_precision(features):
            return F.normalize(self.head(features.float()), dim=1)

    def forward(self, images: torch.Tensor, indices: torch.Tensor, labels=None) -> dict:
        cfg = self.cfg
        perm, lam = None, 1.0
        if self.training and cfg.cutmix_prob > 0 and float(torch.rand(())) < cfg.cutmix_prob:
            images, perm, lam = cutmix(images, cfg.cutmix_alpha)
        z = self.embed(images)  # (B, d)
        with full_precision(z):  # the scores, losses and bank gradient in fp32 under a bf16 / fp16 step
            return self._loss(z, indices, perm, lam)

    def _loss(self, z: torch.Tensor, indices: torch.Tensor, perm: Optional[torch.Tensor], lam: float) -> dict:
        cfg, b = self.cfg, z.shape[0]
        cols, targets = self._scored_columns(indices)  # (C,) or None for every row; (B,)
        bank = self.bank if cols is None else self.bank[cols]  # (C, d), before this step's update
        # `grad`: the scored rows are a leaf of the loss, so the bank step below is the exact
        # gradient of every term of L_total (a new term cannot be left out of the update)
        bank = bank.detach().requires_grad_(self.training and cfg.bank_update == "grad" and torch.is_grad_enabled())
        cosines = z @ bank.T  # (B, C)
        targets_b = targets[perm] if perm is not None else None
        loss_id = instance_loss(cosines, targets, cfg.temperature, targets_b, lam)
        loss = loss_id
        loss_sq = torch.zeros((), device=z.device)
        if cfg.sqrtkl_weight > 0:
            loss_sq = sqrtkl_loss(cosines, cfg.sqrtkl_temperature)
            loss = loss + cfg.sqrtkl_weight * loss_sq
        grad = None
        if bank.requires_grad:  # d(sum over the batch)/dW = B x d(batch mean)/dW; not through the backbone
            grad = torch.autograd.grad(loss, bank, retain_graph=True)[0] * b
        step = BankStep(indices, z.detach(), cols, cosines.detach(), targets, targets_b, perm, lam, grad)
        return {"loss": loss, "parts": {"loss_id": loss_id.detach(), "loss_sqrtkl": loss_sq.detach()}, "bank": step}

    def _scored_columns(self, indices: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """`all`: every bank row, target = own index. k: the batch's rows then k random rows."""
        n, k = self.bank.shape[0], self.cfg.negatives
        if k == "all" or k >= n:
            return None, indices
        sampled = torch.randperm(n, device=indices.device)[:k]  # may repeat a batch row: kept, as released
        return torch.cat([indices, sampled]), torch.arange(indices.shape[0], device=indices.device)

    @torch.no_grad()
    def update(self, out: dict, progress: float = 0.0) -> None:
        """The bank update after the optimizer step (the step's logits used the old bank)."""
        if self.cfg.bank_update == "ema":
            self._update_ema(out["bank"])
        else:
            self._update_grad(out["bank"])

    def _update_ema(self, step: BankStep) -> None:
        """NPID: w_i <- normalise(m w_i + (1 - m) z_i) for the batch's own rows.

        Under CutMix each row takes the view where its image covers the larger area
        (lam >= 0.5: its own; else its partner's); perm is a permutation, so every
        batch row is still updated exactly once.
        """
        m, idx, z = self.cfg.bank_momentum, step.indices, step.z
        if step.perm is not None and step.lam < 0.5:
            idx = idx[step.perm]
        idx, z = all_gather_cat(idx), all_gather_cat(z)  # torchrun: every rank applies every rank's rows
        self.bank[idx] = F.normalize(m * self.bank[idx] + (1 - m) * z, dim=1)

    def bank_gradient(self, step: BankStep) -> tuple[torch.Tensor, torch.Tensor]:
        """d(sum over every rank's batch of L_total)/dW on the scored rows: (rows (R,), grad (R, d)).
        With sampled negatives a row may be scored twice: its rows repeat, and their gradients add."""
        if step.cols is None:  # torchrun: the same summed gradient on each rank
            return torch.arange(step.grad.shape[0], device=step.grad.device), all_reduce_sum(step.grad)
        return all_gather_cat(step.cols), all_gather_cat(step.grad)

    def _update_grad(self, step: BankStep) -> None:
        """docs/method.md's corrected rule: W <- normalise_rows(W - (1 - m) tau grad_W L) on the scored rows.
        index_add_ sums repeated rows' gradients without `unique` (which waits on a GPU to size its output)."""
        rows, grad = self.bank_gradient(step)
        self.bank.index_add_(0, rows, grad, alpha=-(1 - self.cfg.bank_momentum) * self.cfg.temperature)
        self.bank[rows] = F.normalize(self.bank[rows], dim=1)

    @torch.no_grad()
    def calibrate_bank(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Feature calibration: w_i = z_i of the untrained network, every row filled.

        Train-mode BatchNorm (batch statistics, as the first steps see them); the
        BatchNorm running statistics are restored afterwards, so the pass has no side effect.
        """
        saved = {k: v.clone() for k, v in self.named_buffers() if k != "bank"}
        was_training = self.training
        self.train()
        filled = torch.zeros(self.bank.shape[0], dtype=torch.bool, device=self.bank.device)
        for images, indices in batches:
            self.bank[indices] = self.embed(images)
            filled[indices] = True
        if world()[1] > 1:  # torchrun: each rank embedded its share; every rank gets every row
            self.bank.mul_(filled[:, None])
            all_reduce_sum(self.bank)
            filled = all_reduce_sum(filled.float()) > 0
        self.train(was_training)
        for k, v in self.named_buffers():
            if k in saved:
                v.copy_(saved[k])
        if not bool(filled.all()):
            raise RuntimeError(f"calibration left {int((~filled).sum())} bank rows unfilled")
