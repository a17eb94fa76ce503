"""g3n's MLIR passes over the exported torch-dialect module, run between export and iree-compile.

One pass per file (matcher, rewrite, docstring stating the IR it expects and leaves); `PASSES` lists
them in their default order, `pipeline.run_passes` applies them."""

from .altup_fusion import AltUpFusion
from .int4_cpu_kernel import Int4CpuKernel
from .int4_pack import Int4Pack
from .laurel_fusion import LaurelFusion
from .pipeline import Pass, PassContext, PassError, check_pass_names, run_passes
from .sliding_window import SlidingWindowDecode

PASSES: list[type[Pass]] = [AltUpFusion, LaurelFusion, SlidingWindowDecode, Int4Pack, Int4CpuKernel]

__all__ = ["PASSES", "Pass", "PassContext", "PassError", "check_pass_names", "run_passes"]
