"""Pure building blocks defined by the papers' formulas, each tested against its equation.

One module per topic; every public function is re-exported here.
"""

from wsimil_core.functional.attention import anchor_kl, attention_jsd, nsf  # noqa: F401
from wsimil_core.functional.attention_plus import attention_plus, attention_plus_reference, attention_sparsity  # noqa: F401
from wsimil_core.functional.distill import akd_loss, kd_kl_loss  # noqa: F401
from wsimil_core.functional.kan import chebyshev_basis  # noqa: F401
from wsimil_core.functional.memory import memory_alignment_loss, memory_loss, memory_score  # noqa: F401
from wsimil_core.functional.routing import top_p_route  # noqa: F401
