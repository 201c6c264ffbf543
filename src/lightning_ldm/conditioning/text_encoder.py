"""The paper's text encoder tau_theta: a BERT-style transformer trained from scratch jointly with the UNet.

This is LDM's ``BERTEmbedder`` (``cond_stage_trainable: true`` in ``txt2img-1p4B-eval.yaml``), which wraps the
vendored x-transformers ``TransformerWrapper(attn_layers=Encoder(...))`` of ``ldm/modules/x_transformer.py``
with that library's defaults: a learned token embedding and a learned absolute position embedding (both
initialised N(0, 0.02)), ``depth`` pre-norm pairs of self-attention and feed-forward with residuals, and a final
LayerNorm. Attention is 8 heads of 64 dimensions whatever the width (inner width 512 at the paper's 1280), with
bias-free q/k/v projections and a biased output projection; the feed-forward is Linear-GELU-Linear, 4x wide,
both biased. The output is the final norm's hidden states (``return_embeddings=True``): (B, L, dim), the
cross-attention context of the UNet.

Two differences from the reference, neither of which changes the parameter count:

- the padding is masked out of the keys (the reference attends to its [PAD] tokens), so a caption's encoding
  does not depend on how much padding follows it. Padded query positions still attend to the real tokens, so
  every output row is finite and carries the caption, as the UNet's cross-attention reads all ``length`` rows;
- ``TransformerWrapper`` always builds a ``to_logits`` projection back to the vocabulary that the embedder never
  calls. It is left out by default: unused parameters cost optimiser state and EMA work for nothing, and DDP
  stops on parameters that never get a gradient unless told to look for them. ``include_logits_head=True``
  keeps it, for the released model's exact parameter count and state dict (``PAPER_TXT2IMG``), frozen
  (``requires_grad`` off), so that it still costs no optimiser state and DDP needs no unused-parameter search.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# LDM's text-to-image model (txt2img-1p4B: BERTEmbedder(n_embed=1280, n_layer=32), BERT's vocabulary, 77
# tokens). Its released checkpoint holds the unused to_logits head, so the preset keeps it.
PAPER_TXT2IMG = dict(vocab_size=30522, length=77, dim=1280, depth=32, heads=8, dim_head=64, ff_mult=4, dropout=0.0,
                     include_logits_head=True)
# The released cond-stage parameter count: embeddings 39,166,720 + 32 layers x 15,741,440 + final norm 2,560
# + to_logits 39,098,682.
PAPER_TXT2IMG_PARAMETERS = 581_994_042


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        # as x-transformers' Attention: q/k/v without bias, the output projection with one
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, keys: Optional[Tensor]) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """One attention + feed-forward pair, each pre-normed with its own LayerNorm (x-transformers' pre_norm)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dim_head, dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(self, x: Tensor, keys: Optional[Tensor]) -> Tensor:
        x = x + self.attn(self.attn_norm(x), keys)
        return x + self.ff(self.ff_norm(x))


class TransformerTextEncoder(nn.Module):
    def __init__(self, *, vocab_size: int, length: int, dim: int, depth: int, heads: int = 8, dim_head: int = 64,
                 ff_mult: int = 4, dropout: float = 0.0, include_logits_head: bool = False) -> None:
        super().__init__()
        self.vocab_size, self.length, self.dim = vocab_size, length, dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(length, dim)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        # never called in forward; see the module docstring
        self.to_logits = nn.Linear(dim, vocab_size).requires_grad_(False) if include_logits_head else None
        self.reset_embeddings()

    def reset_embeddings(self) -> None:
        # x-transformers initialises both embeddings N(0, 0.02); the linears keep PyTorch's default
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Hidden states (B, L, dim) of token ids (B, L); ``mask`` (B, L, bool) is False at padding."""
        if ids.shape[1] > self.length:
            raise ValueError(f"{ids.shape[1]} tokens, more than the encoder's length {self.length}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_dropout(self.token_emb(ids) + self.pos_emb(positions))
        keys = None
        if mask is not None:
            mask = mask.to(torch.bool)
            # a row without any real key would make every attention weight 0/0; let it attend to all keys
            mask = mask | ~mask.any(dim=1, keepdim=True)
            keys = mask[:, None, None, :]  # (B, 1, 1, L): the same keys for every head and query
        for block in self.blocks:
            x = block(x, keys)
        return self.norm(x)
