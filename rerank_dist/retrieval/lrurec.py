"""LRURec: a sequential recommender built from linear recurrent units (Yue et al., 2023).

The architecture and initialisation follow the model LlamaRec uses as its retriever:
item embedding -> LayerNorm, then blocks of [complex diagonal linear recurrence + residual +
LayerNorm] -> [position-wise FFN + residual + LayerNorm], and item scores
``hidden @ item_embeddings^T + bias``. Item id 0 is padding; sequences are left-padded.

The recurrence ``h_t = lambda * h_{t-1} + gamma * B x_t`` is computed with a parallel scan in
log2(L) steps. The scan never carries state out of a padding position, so the hidden state at
a real position depends only on the real items before it: left padding does not change it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rerank_dist.config import RetrieverConfig

PAD = 0


class LRURec(nn.Module):
    def __init__(self, num_items: int, embed_dim: int = 64, num_blocks: int = 2,
                 dropout: float = 0.2, attn_dropout: float = 0.2):
        super().__init__()
        self.num_items = num_items
        self.embedding = LRUEmbedding(num_items, embed_dim, dropout)
        self.blocks = nn.ModuleList(LRUBlock(embed_dim, dropout, attn_dropout) for _ in range(num_blocks))
        # One bias per item (index 0 = padding) added to every score.
        self.bias = nn.Parameter(torch.zeros(num_items + 1))
        _truncated_normal_init(self)

    @classmethod
    def from_config(cls, cfg: RetrieverConfig, num_items: int) -> "LRURec":
        return cls(num_items, cfg.embed_dim, cfg.num_blocks, cfg.dropout, cfg.attn_dropout)

    def hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs (B, L) item ids, 0 = left padding -> hidden states (B, L, D)."""
        x, mask = self.embedding(seqs)  # (B, L, D), (B, L)
        seq_len = x.size(1)
        # The scan halves blocks, so it needs a power-of-two length: pad more on the left.
        padded_len = 1 << max(0, math.ceil(math.log2(seq_len)))
        x = F.pad(x, (0, 0, padded_len - seq_len, 0))  # (B, P, D)
        mask = F.pad(mask, (padded_len - seq_len, 0))  # (B, P)
        for block in self.blocks:
            x = block(x, mask)
        return x[:, -seq_len:]  # (B, L, D)

    @property
    def device(self) -> torch.device:
        """Where the weights are: callers move their batches here."""
        return self.bias.device

    def scores_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> scores (..., V+1); column 0 is padding and never a valid item."""
        return hidden @ self.embedding.token.weight.T + self.bias

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs (B, L) -> next-item scores at every position (B, L, V+1)."""
        return self.scores_from_hidden(self.hidden(seqs))

    def last_scores(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs (B, L) -> next-item scores after the last position (B, V+1)."""
        return self.scores_from_hidden(self.hidden(seqs)[:, -1])


class LRUEmbedding(nn.Module):
    def __init__(self, num_items: int, embed_dim: int, dropout: float):
        super().__init__()
        self.token = nn.Embedding(num_items + 1, embed_dim)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = seqs != PAD  # (B, L)
        return self.layer_norm(self.dropout(self.token(seqs))), mask  # (B, L, D), (B, L)


class LRUBlock(nn.Module):
    def __init__(self, embed_dim: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.lru_layer = LRULayer(embed_dim, attn_dropout)
        self.feed_forward = PositionwiseFeedForward(embed_dim, 4 * embed_dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.lru_layer(x, mask))  # (B, L, D)


class LRULayer(nn.Module):
    """Diagonal complex linear recurrence with a state twice the model width.

    lambda = exp(-exp(nu_log) + i exp(theta_log)), |lambda| initialised uniformly in the ring
    [r_min, r_max]; gamma = sqrt(1 - |lambda|^2) normalises the input (stored as logs).
    """

    def __init__(self, embed_dim: int, dropout: float, r_min: float = 0.8, r_max: float = 0.99):
        super().__init__()
        state_dim = 2 * embed_dim
        u1, u2 = torch.rand(state_dim), torch.rand(state_dim)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = torch.log(u2 * math.pi * 2)
        lamb = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
        gamma_log = torch.log(torch.sqrt(1 - lamb.abs() ** 2))
        self.params_log = nn.Parameter(torch.vstack((nu_log, theta_log, gamma_log)))  # (3, H)
        self.in_proj = nn.Linear(embed_dim, state_dim, dtype=torch.cfloat)
        self.out_proj = nn.Linear(state_dim, embed_dim, dtype=torch.cfloat)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def lambda_gamma(self) -> tuple[torch.Tensor, torch.Tensor]:
        nu, theta, gamma = torch.exp(self.params_log)  # each (H,)
        return torch.exp(torch.complex(-nu, theta)), gamma  # (H,) complex, (H,) real

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) with L a power of two, mask (B, L) -> (B, L, D)."""
        lamb, gamma = self.lambda_gamma()
        bu = self.in_proj(x.to(torch.cfloat)) * gamma  # (B, L, H) complex
        h = parallel_scan(bu, lamb, mask)  # (B, L, H)
        return self.layer_norm(self.dropout(self.out_proj(h).real) + x)


def parallel_scan(bu: torch.Tensor, lamb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h_t = lamb * h_{t-1} + bu_t for all t, in log2(L) steps; state never flows out of a masked position.

    bu (B, L, H) complex with L a power of two; lamb (H,); mask (B, L) bool (False = padding).
    At level k the sequence is cut into blocks of 2^(k+1); the second half of each block adds
    lamb^(1..half) times the last state of the first half (which already covers its whole block).
    """
    B, L, H = bu.shape
    powers = lamb.unsqueeze(0)  # (half, H): lamb^1 .. lamb^half
    h = bu
    half = 1
    while half < L:
        size = 2 * half
        h = h.reshape(B * L // size, size, H)  # (N, size, H)
        m = mask.reshape(B * L // size, size)  # (N, size)
        first, second = h[:, :half], h[:, half:]  # (N, half, H) each
        carry = first[:, -1:] * m[:, half - 1: half].unsqueeze(-1)  # (N, 1, H)
        h = torch.cat([first, second + powers * carry], dim=1)  # (N, size, H)
        powers = torch.cat([powers, powers * powers[-1]], dim=0)  # (2*half, H)
        half = size
    return h.reshape(B, L, H)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.dropout(self.activation(self.w_1(x)))  # (B, L, 4D)
        return self.layer_norm(self.dropout(self.w_2(inner)) + x)  # (B, L, D)


@torch.no_grad()
def _truncated_normal_init(model: nn.Module, std: float = 0.02) -> None:
    """N(0, std) truncated at +-2 std for every weight and bias (real and imaginary parts alike),
    except LayerNorms and the recurrence parameters, which keep their own initialisation."""
    for name, p in model.named_parameters():
        if "layer_norm" in name or "params_log" in name:
            continue
        parts = (p.real, p.imag) if p.is_complex() else (p,)
        for part in parts:
            nn.init.trunc_normal_(part, mean=0.0, std=std, a=-2 * std, b=2 * std)
