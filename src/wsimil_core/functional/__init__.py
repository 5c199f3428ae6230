"""Pure building blocks defined by the papers' formulas, each tested against its equation.

One module per topic; every public function is re-exported here.
"""

from wsimil_core.functional.attention import anchor_kl, attention_jsd, nsf
from wsimil_core.functional.attention_plus import attention_plus, attention_plus_reference, attention_sparsity
from wsimil_core.functional.distill import akd_gated_loss, akd_loss, kd_kl_loss
from wsimil_core.functional.graph import gatv2_attention, knn_neighbors
from wsimil_core.functional.kan import chebyshev_basis
from wsimil_core.functional.memory import (
    memory_alignment_loss,
    memory_attention,
    memory_commitment,
    memory_delta,
    memory_loss,
    memory_nearest,
    memory_orthogonality,
    memory_phi,
    memory_pool,
    memory_score,
    usage_stats,
)
from wsimil_core.functional.routing import top_p_route
from wsimil_core.functional.survival import (
    cox_partial_nll,
    cox_risk,
    curve_risk,
    hazard_nll,
    incidence_curve,
    incidence_nll,
    survival_curve,
)
from wsimil_core.functional.svm import smooth_top1_svm_loss

__all__ = [
    "anchor_kl",
    "attention_jsd",
    "nsf",
    "attention_plus",
    "attention_plus_reference",
    "attention_sparsity",
    "akd_loss",
    "akd_gated_loss",
    "kd_kl_loss",
    "chebyshev_basis",
    "gatv2_attention",
    "knn_neighbors",
    "memory_alignment_loss",
    "memory_attention",
    "memory_commitment",
    "memory_delta",
    "memory_loss",
    "memory_nearest",
    "memory_orthogonality",
    "memory_phi",
    "memory_pool",
    "memory_score",
    "usage_stats",
    "top_p_route",
    "smooth_top1_svm_loss",
    "hazard_nll",
    "survival_curve",
    "curve_risk",
    "cox_risk",
    "cox_partial_nll",
    "incidence_nll",
    "incidence_curve",
]
