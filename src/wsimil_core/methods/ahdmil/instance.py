"""CLAM-style instance-level loss of DMIN (AHDMIL authors' code; CLAM, Lu et al. 2021, Sec. "Instance-level
clustering").

For a bag of class ``y`` with patch embeddings ``h`` ``[N, H]`` and class attention logits ``s`` ``[N, C]``, and
the per-class instance classifiers ``inst_c`` (``nn.Linear(H, 2)``):

* in-class (``c = y``): the ``k`` patches of highest ``s[:, y]`` are pseudo-labelled 1, the ``k`` of lowest 0;
* out-of-class (``c != y``, only with ``subtyping``): the ``k`` patches of highest ``s[:, c]`` are labelled 0;

each set is scored by ``inst_c`` and penalised with the smooth top-1 SVM loss
(:func:`wsimil_core.functional.smooth_top1_svm_loss`, alpha = tau = 1); the terms are summed (and averaged over
the classes with ``subtyping``, as CLAM does). ``k = min(k_sample, n // 2)`` for ``n`` candidate patches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsimil_core.functional.svm import smooth_top1_svm_loss


def instance_loss(
    embeddings: Tensor,
    attention_logits: Tensor,
    classifiers: nn.ModuleList,
    label: int,
    k_sample: int = 8,
    subtyping: bool = False,
    allowed: Tensor | None = None,
) -> Tensor:
    """The instance loss of one bag (module docstring).

    Args:
        embeddings: ``[N, H]`` patch embeddings ``h``.
        attention_logits: ``[N, C]`` class attention logits ``s``.
        classifiers: ``C`` instance classifiers, each ``[.., H] -> [.., 2]``.
        label: the bag's class ``y``.
        k_sample: patches per pseudo-label set (8 in CLAM).
        subtyping: add the out-of-class terms (CLAM's ``subtyping``).
        allowed: ``[N]`` bool: candidates (e.g. the patches DB-LIPN kept); default all.

    Returns:
        A scalar; 0 (with a graph) when fewer than 2 candidates.
    """
    h, s = embeddings, attention_logits
    if allowed is not None:
        idx = torch.nonzero(allowed.reshape(-1), as_tuple=False).reshape(-1)
        h, s = h[idx], s[idx]
    k = min(int(k_sample), h.shape[0] // 2)
    total = h.sum() * 0.0
    if k < 1:
        return total
    for c, clf in enumerate(classifiers):
        if c == label:
            top = torch.topk(s[:, c], k).indices
            bottom = torch.topk(-s[:, c], k).indices
            chosen = torch.cat([top, bottom])
            target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
        elif subtyping:
            chosen = torch.topk(s[:, c], k).indices
            target = torch.zeros(k, dtype=torch.long, device=h.device)
        else:
            continue
        total = total + smooth_top1_svm_loss(clf(h[chosen]), target)
    if subtyping:
        total = total / len(classifiers)
    return total


__all__ = ["instance_loss"]
