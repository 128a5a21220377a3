"""TokenLayout: where the tokens an explanation covers come from, and the one place their maps
are cut, reshaped to the patch grid, upsampled and min-max normalised."""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = Tuple[int, int]


def _pair(value: Union[None, int, Tuple[int, int], list], name: str) -> Optional[Pair]:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"relfast.TokenLayout: argument '{name}' must be a positive int or a pair of positive ints, "
                         f"got {value!r}")
    return pair


@dataclass(frozen=True)
class TokenLayout:
    """The token stream of a single-stream transformer.

    Args:
        prefix_tokens: special tokens before the content tokens (ViT/BERT: 1 for CLS; DeiT: 2 with
            the distillation token; a causal LM: 0). Maps over the content drop them.
        patch_grid: (h_p, w_p) for vision models: the content tokens are the patches, row-major.
        patch_size: pixels per patch side (an int or (h, w)); needed to upsample maps to pixels.
        explained_token: the token whose relevance row is explained: an index (default 0, the
            class token), or "last" for the last real token (causal LMs: the position whose
            next-token logits are explained; with an attention mask, the last unmasked one).
    """

    prefix_tokens: int = 1
    patch_grid: Optional[Pair] = None
    patch_size: Optional[Pair] = None
    explained_token: Union[int, str] = 0

    def __post_init__(self):
        if not isinstance(self.prefix_tokens, int) or isinstance(self.prefix_tokens, bool) or self.prefix_tokens < 0:
            raise ValueError(f"relfast.TokenLayout: argument 'prefix_tokens' must be an int >= 0, got "
                             f"{self.prefix_tokens!r}")
        object.__setattr__(self, "patch_grid", _pair(self.patch_grid, "patch_grid"))
        object.__setattr__(self, "patch_size", _pair(self.patch_size, "patch_size"))
        token = self.explained_token
        if not (token == "last" or (isinstance(token, int) and not isinstance(token, bool) and token >= 0)):
            raise ValueError(f"relfast.TokenLayout: argument 'explained_token' must be an index >= 0 or 'last', got "
                             f"{token!r}")

    @property
    def is_vision(self) -> bool:
        return self.patch_grid is not None

    @property
    def num_tokens(self) -> Optional[int]:
        """Tokens of a vision model (prefix + patches); None for text (it varies with the input)."""
        return None if self.patch_grid is None else self.prefix_tokens + self.patch_grid[0] * self.patch_grid[1]

    def explained_rows(self, batch: int, token_mask: Optional[Tensor], num_tokens: int, device) -> Tensor:
        """(B,) int64: the explained token of each sample."""
        if self.explained_token == "last":
            if token_mask is None:
                return torch.full((batch,), num_tokens - 1, dtype=torch.long, device=device)
            positions = torch.arange(num_tokens, device=token_mask.device).expand(batch, num_tokens)
            return torch.where(token_mask.bool(), positions, -1).amax(dim=1).to(device)
        if self.explained_token >= num_tokens:
            raise ValueError(f"relfast.TokenLayout: 'explained_token' {self.explained_token} is out of range for "
                             f"{num_tokens} tokens")
        return torch.full((batch,), self.explained_token, dtype=torch.long, device=device)

    def to_grid(self, relevance: Tensor) -> Tensor:
        """(..., N) rows over all tokens -> (..., h_p, w_p) patch maps (prefix tokens dropped)."""
        if self.patch_grid is None:
            raise ValueError("relfast: the model is not a vision model (its layout has no patch grid); use .relevance")
        if relevance.dim() < 1 or relevance.shape[-1] != self.num_tokens:
            raise ValueError(f"relfast: a patch map needs rows over the model's {self.num_tokens} tokens (the explained "
                             f"row, full_matrix=False); got relevance of shape {tuple(relevance.shape)}")
        return relevance[..., self.prefix_tokens:].reshape(*relevance.shape[:-1], *self.patch_grid)

    def to_pixels(self, grid_maps: Tensor, normalize: bool = True) -> Tensor:
        """(..., h_p, w_p) -> (..., H, W): bilinear upsampling by the patch size (align_corners=False),
        as the reference code does, then (``normalize``) each map min-max normalised to [0, 1]."""
        if self.patch_size is None:
            raise ValueError("relfast: upsampling needs the layout's 'patch_size'")
        lead = grid_maps.shape[:-2]
        maps = F.interpolate(grid_maps.reshape(-1, 1, *grid_maps.shape[-2:]), scale_factor=self.patch_size,
                             mode="bilinear", align_corners=False)
        return (min_max(maps) if normalize else maps).reshape(*lead, *maps.shape[-2:])


def min_max(maps: Tensor) -> Tensor:
    """Each map (the last two dimensions) scaled to [0, 1]; a constant map becomes 0."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
