"""Tamiyo's network over sets of slots and candidate blueprints (plain torch, no RLlib).

One encoder is shared by all slots and one by all candidates; a scorer shared by all
(slot, candidate) pairs gives the germinate logits, per-slot heads the fossilize and cull
logits, and a pooled context the wait logit. Every set is pooled with a masked mean, so
the network takes hosts of any depth and catalogues of any size up to the layout's maxima,
and permuting the candidates (or slots) permutes its logits the same way: the choice of a
blueprint follows its features, never its place in the list. The value head reads the same
pooled context through encoders of its own (no weights shared with the policy).

RLlib trains it inside ``esper_ray.simic.module.TamiyoSetModule``; an exported policy is this
module's ``state_dict`` as safetensors, run by ``esper_ray.tamiyo.policy``.
"""

from __future__ import annotations

import torch
from torch import nn

from esper_ray.tamiyo.encoding import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    PAIR_FEATURES,
    SLOT_FEATURES,
    SetLayout,
)

WAIT_PRIOR = 2.0
"""Initial bias of the wait logit (an initialisation only; training moves it)."""


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def _masked_mean(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of ``x`` [B, N, D] where ``present`` [B, N] is 1 (0 for an empty set)."""
    w = present.unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class SetEncoder(nn.Module):
    """Global features and the slot and candidate sets -> per-slot, per-candidate and pooled embeddings."""

    def __init__(self, hidden: int):
        super().__init__()
        self.glob = _mlp(GLOBAL_FEATURES, hidden, hidden)
        self.slot = _mlp(SLOT_FEATURES + hidden, hidden, hidden)
        self.cand = _mlp(CANDIDATE_FEATURES, hidden, hidden)
        self.context = _mlp(3 * hidden, hidden, hidden)

    def forward(self, glob: torch.Tensor, slots: torch.Tensor, cands: torch.Tensor):
        g = torch.tanh(self.glob(glob))
        s = torch.tanh(self.slot(torch.cat([slots, g.unsqueeze(1).expand(-1, slots.shape[1], -1)], -1)))
        c = torch.tanh(self.cand(cands))
        ctx = torch.tanh(
            self.context(torch.cat([g, _masked_mean(s, slots[..., 0]), _masked_mean(c, cands[..., 0])], -1))
        )
        return s, c, ctx


class SetPolicyNet(nn.Module):
    """Flat observation (``SetLayout``) -> (action logits over ``layout.n_actions``, value)."""

    def __init__(self, layout: SetLayout, hidden: int = 64):
        super().__init__()
        self.layout = layout
        self.hidden = hidden
        self.pi_enc = SetEncoder(hidden)
        self.vf_enc = SetEncoder(hidden)
        self.pair = _mlp(3 * hidden + PAIR_FEATURES, hidden, 1)
        self.slot_heads = _mlp(2 * hidden, hidden, 2)  # fossilize, cull
        self.wait = _mlp(hidden, hidden, 1)
        self.value_head = _mlp(hidden, hidden, 1)
        with torch.no_grad():  # start out mostly waiting: a few germinations per episode, not one per step
            last = self.wait[-1]
            assert isinstance(last, nn.Linear)
            last.bias.fill_(WAIT_PRIOR)

    def split(self, obs: torch.Tensor):
        """The flat batch [B, size] as (global, slots [B,S,F], candidates [B,K,F], pairs [B,S,K,F])."""
        lay, b = self.layout, obs.shape[0]
        glob = obs[:, : lay.slots_at]
        slots = obs[:, lay.slots_at : lay.candidates_at].reshape(b, lay.max_slots, SLOT_FEATURES)
        cands = obs[:, lay.candidates_at : lay.pairs_at].reshape(b, lay.k, CANDIDATE_FEATURES)
        pairs = obs[:, lay.pairs_at :].reshape(b, lay.max_slots, lay.k, PAIR_FEATURES)
        return glob, slots, cands, pairs

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Unmasked logits [B, n_actions] in the order of ``encoding.ActionSpace``."""
        glob, slots, cands, pairs = self.split(obs)
        s, c, ctx = self.pi_enc(glob, slots, cands)
        n_s, n_c = s.shape[1], c.shape[1]
        grid = torch.cat(
            [
                s.unsqueeze(2).expand(-1, -1, n_c, -1),
                c.unsqueeze(1).expand(-1, n_s, -1, -1),
                ctx[:, None, None, :].expand(-1, n_s, n_c, -1),
                pairs,
            ],
            -1,
        )
        germinate = self.pair(grid).flatten(1)  # [B, S*K], slot-major like the action indices
        per_slot = self.slot_heads(torch.cat([s, ctx.unsqueeze(1).expand(-1, n_s, -1)], -1))
        return torch.cat([self.wait(ctx), germinate, per_slot[..., 0], per_slot[..., 1]], -1)

    def policy_logits(self, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked logits of the policy's distribution (what PPO samples and inference takes the argmax of).

        The germinate logits are lowered by log(number of legal germinations), so the chance of
        germinating at all does not grow with slots x candidates: a host with 6 slots and 10
        candidates is not 60 times as tempting as one choice. Scores among germinations keep
        their order (the shift is the same for all of them).
        """
        logits = self.logits(obs)
        lay = self.layout
        germ = slice(1, 1 + lay.max_slots * lay.k)
        n_germ = mask[:, germ].sum(-1, keepdim=True).clamp(min=1.0)
        shift = torch.zeros_like(logits)
        shift[:, germ] = torch.log(n_germ)
        return masked_logits(logits - shift, mask)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """State value [B]."""
        glob, slots, cands, _ = self.split(obs)
        return self.value_head(self.vf_enc(glob, slots, cands)[2]).squeeze(-1)


def masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Illegal actions at the float32 minimum (not -inf, so entropies over the legal ones stay finite)."""
    return logits + torch.clamp(torch.log(mask), min=torch.finfo(logits.dtype).min)
