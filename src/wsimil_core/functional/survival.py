"""Survival losses and outputs: the discrete-time hazard NLL and the Cox partial likelihood (Breslow ties).

Discrete time (Zadeh & Schmid 2020, "Bias in cross-entropy-based training of deep survival networks", Eq. 3-5;
the convention of PORPOISE/MCAT and the ABMILX code): follow-up is cut into ``K`` bins; the model gives one logit
per bin, the hazard ``h_k = sigmoid(l_k)`` = P(event in bin k | alive at its start), the survival
``S_k = prod_{j<=k} (1 - h_j)`` = P(alive at the end of bin k). A slide with an event in bin ``y`` contributes
``-log S_{y-1} - log h_y``; a slide censored in bin ``y`` (alive at its censoring time) ``-log S_y``.

Incidence (the "incidence-based discrete survival formulation" of ASMIL's Appendix N, after Liu et al. 2025): the
softmax of the ``K`` logits is the distribution of the event bin, ``p_k``; ``S_k = 1 - sum_{j<=k} p_j``. An event in
bin ``y`` contributes ``-log p_y``; a slide censored in bin ``y`` ``-log sum_{j>=y} p_j`` (alive at the start of its
bin: the last bin has no later mass to put it in).

Cox (Cox 1972; Breslow 1974 for ties): ``-1/n_e * sum_{i: e_i=1} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]``, every
tied event sharing the whole risk set. A Cox head is the difference of two logits, ``r = l_1 - l_0`` (a linear
risk head; models keep their ``C >= 2`` outputs), so the softmax of the two logits is ``sigmoid(r)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hazard_nll(logits: Tensor, bins: Tensor, events: Tensor, alpha: float = 0.0) -> Tensor:
    """Discrete-time negative log-likelihood with sigmoid hazards (Zadeh & Schmid 2020, Eq. 3-5).

    Args:
        logits: ``[B, K]`` one logit per time bin.
        bins: ``[B]`` int bin index of each slide's time (event or censoring).
        events: ``[B]`` 1 = event observed, 0 = censored.
        alpha: weight of an extra uncensored-only term, ``(1 - alpha) * L + alpha * L_uncensored`` (MCAT's
            ``alpha``; 0 = the plain likelihood).

    Returns:
        Scalar: the mean over the ``B`` slides.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    y = bins.long().reshape(-1, 1)
    e = events.float().reshape(-1)
    log_h = F.logsigmoid(logits)  # log h_k
    log_1mh = F.logsigmoid(-logits)  # log (1 - h_k)
    log_s = torch.cumsum(log_1mh, dim=1)  # log S_k
    log_s_pad = torch.cat([torch.zeros_like(log_s[:, :1]), log_s], dim=1)  # log S_{k-1}, S_{-1} = 1
    uncensored = -e * (log_s_pad.gather(1, y).squeeze(1) + log_h.gather(1, y).squeeze(1))
    censored = -(1.0 - e) * log_s.gather(1, y).squeeze(1)
    loss = uncensored + censored
    if alpha:
        loss = (1.0 - alpha) * loss + alpha * uncensored
    return loss.mean()


def incidence_nll(logits: Tensor, bins: Tensor, events: Tensor) -> Tensor:
    """Discrete-time NLL of the incidence (softmax) formulation (module docstring). Shapes as :func:`hazard_nll`."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    y = bins.long().reshape(-1, 1)
    e = events.float().reshape(-1)
    log_p = F.log_softmax(logits, dim=1)
    # log sum_{j>=k} p_j: reversed cumulative logsumexp
    log_tail = torch.flip(torch.logcumsumexp(torch.flip(log_p, [1]), dim=1), [1])
    uncensored = -e * log_p.gather(1, y).squeeze(1)
    censored = -(1.0 - e) * log_tail.gather(1, y).squeeze(1)
    return (uncensored + censored).mean()


def incidence_curve(logits: Tensor) -> Tensor:
    """``S_k = 1 - sum_{j<=k} softmax(l)_j`` ``[..., K]`` (the last value is 0)."""
    return (1.0 - torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)).clamp_min(0.0)


def survival_curve(logits: Tensor) -> Tensor:
    """``S_k = prod_{j<=k} sigmoid(-l_j)``: P(alive at the end of bin k), ``[..., K]`` from logits ``[..., K]``."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits.float()), dim=-1))


def curve_risk(curve: Tensor) -> Tensor:
    """Risk of a discrete survival curve ``[..., K]``: minus the sum of ``S_k`` (minus the expected number of
    bins survived), so a higher value means earlier events. Returns ``[...]``."""
    return -curve.sum(dim=-1)


def cox_risk(logits: Tensor) -> Tensor:
    """Log relative risk of a Cox head: ``l_1 - l_0`` of logits ``[..., 2]``; returns ``[...]``."""
    if logits.shape[-1] != 2:
        raise ValueError(f"a Cox head has 2 logits (risk = l1 - l0), got shape {tuple(logits.shape)}")
    return logits[..., 1].float() - logits[..., 0].float()


def cox_partial_nll(risk: Tensor, times: Tensor, events: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over events.

    Args:
        risk: ``[B]`` log relative risks.
        times: ``[B]`` event or censoring times.
        events: ``[B]`` 1 = event, 0 = censored.

    Returns:
        Scalar; 0 (still attached to ``risk``'s graph) when no slide has an event.
    """
    r = risk.float().reshape(-1)
    t = times.reshape(-1).to(r.device, torch.float64)
    e = events.reshape(-1).to(r.device) > 0.5
    if not bool(e.any()):
        return r.sum() * 0.0
    at_risk = t.unsqueeze(0) >= t.unsqueeze(1)  # [i, j]: j is in the risk set of i
    masked = r.unsqueeze(0).expand(len(r), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(masked, dim=1)
    return -(r - log_denominator)[e].mean()


__all__ = [
    "incidence_nll",
    "incidence_curve",
    "hazard_nll",
    "survival_curve",
    "curve_risk",
    "cox_risk",
    "cox_partial_nll",
]
