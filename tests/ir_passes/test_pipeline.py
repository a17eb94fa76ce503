"""The pass pipeline: order, dependencies, dumps, the rewrite layer's match-then-rewrite driver, and the check
that every pass found the sites the config says it must."""

import pytest

from helpers import context, count, fixture
from passes import PASSES, PassError, run_passes
from passes.altup_fusion import AltUpFusion
from passes.ir import Pattern, apply_patterns, ops, parse_module
from passes.pipeline import Pass, ordered

MIXES = "altup_fusion_stream_mix.mlir"


def test_pipeline_order_and_errors(tmp_path):
    class Late(Pass):
        """Runs after int4."""
        name, after = "late", ("int4-pack",)

    assert [p.name for p in ordered([Late, *PASSES])] == ["altup-fusion", "laurel-fusion", "sliding-window", "int4-pack",
                                                           "late", "int4-cpu-kernel"]
    ctx = context()
    with pytest.raises(PassError, match="unknown pass 'nope'"):
        run_passes(fixture(MIXES), ctx, PASSES, disabled=["nope"])

    class Needy(Pass):
        """Needs AltUp fusion."""
        name, requires = "needy", ("altup-fusion",)

    with pytest.raises(PassError, match="requires altup-fusion"):
        run_passes(fixture(MIXES), ctx, [AltUpFusion, Needy], disabled=["altup-fusion"])
    after, report = run_passes(fixture(MIXES), ctx, PASSES, disabled=["altup-fusion"], dump_after=["all"],
                               dump_dir=tmp_path, check_sites=False, log=lambda *_: None)
    assert count(after, "torch.aten.bmm") == 2 and not report[0]["enabled"]  # both left as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-altup-fusion.mlir", "01-laurel-fusion.mlir",
                                                          "02-sliding-window.mlir", "03-int4-pack.mlir",
                                                          "04-int4-cpu-kernel.mlir"]


def test_a_pass_that_misses_sites_stops_the_compile():
    """The fixture holds three stream contractions and no whole layer: against tiny-random's config (6 layers, a prefill
    and a decode function) every count is off, and the error names the pass, the patterns and both counts."""
    with pytest.raises(PassError) as e:
        run_passes(fixture(MIXES), context(), [AltUpFusion], log=lambda *_: None)
    message = str(e.value)
    assert "pass altup-fusion" in message and "--disable-pass altup-fusion" in message
    assert "one-token-predict: 0 sites, 6 expected" in message and "stream-mix: 3 sites, 18 expected" in message
    assert "6 layers" in message


def test_patterns_match_everything_before_rewriting():
    """A rewrite that creates ops its own pattern would match does not feed itself: the sites are those of the IR
    the pattern started from."""

    class DoubleTanh(Pattern):
        name = "double-tanh"

        def match(self, op, ctx):
            return op if op.name == "torch.aten.tanh" else None

        def rewrite(self, op, ctx):
            from iree.compiler import ir

            with op.location, ir.InsertionPoint(op):
                twice = ir.Operation.create("torch.aten.tanh", results=[op.result.type], operands=[op.result])
            for use in list(op.result.uses):
                if use.owner.operation != twice:
                    use.owner.operation.operands[use.operand_number] = twice.result

    module = parse_module("""
      func.func @f(%x: !torch.vtensor<[2],f32>) -> !torch.vtensor<[2],f32> {
        %0 = torch.aten.tanh %x : !torch.vtensor<[2],f32> -> !torch.vtensor<[2],f32>
        return %0 : !torch.vtensor<[2],f32>
      }""")
    with module.context:
        assert apply_patterns(module, [DoubleTanh()], context()) == {"double-tanh": 1}
        assert len(ops(module, "torch.aten.tanh")) == 2
