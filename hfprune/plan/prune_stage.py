"""Memory and FLOP formulas of the prune stage (calibration, scoring, surgery), for `hfprune.plan.estimate`.

Each method's terms follow how it calibrates in `hfprune.pruners.calibration`: a streamed forward per batch
(statistics reduced on the device), minitron_depth's traced forward reusing the prefix before each
candidate block, or the sparse pruners' sequential walk holding hidden states up to a byte budget.
Notation as in `hfprune.plan.terms`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from hfprune.plan.disk import TEMP, DiskTerm
from hfprune.plan.hardware import GIB
from hfprune.plan.terms import TOKEN_ID_BYTES, Knob, Shape, StageEstimate, Term, baseline, weights


# How each method calibrates (hfprune/pruners/calibration.py): "stream" is one forward per batch with statistics
# reduced where they are computed; "blocks" is minitron_depth's traced forward per batch, resuming each
# candidate from the hidden state before its block; "sequential" is the sparse pruners' layer-by-layer
# walk, holding every window's hidden state at the current depth up to a byte budget (the rest spills).
CALIBRATION_MODES = {"minitron_depth": "blocks", "wanda": "sequential", "sparsegpt": "sequential"}
LOGIT_SLICE_ELEMENTS = 2**26  # minitron_depth's losses read the LM head this many logits at a time


@dataclass(frozen=True)
class Calibration:
    """The calibration set as the formulas see it: N windows of S tokens in batches of B."""

    n: int
    s: int
    b: int
    budget: int | None = None  # the sequential walk's max_activation_bytes

    @property
    def batches(self) -> int:
        return math.ceil(self.n / self.b)


def prune_stage(
    method: str, calibrated: bool, parent: Shape, pruned: Shape, calibration: Any, options: Any, sparse: bool
) -> StageEstimate:
    """Calibration, scoring and surgery, with the memory of the way `method` calibrates."""
    cal = Calibration(
        calibration.num_samples,
        calibration.seq_len,
        calibration.batch_size,
        getattr(options, "max_activation_bytes", None),
    )
    hint = f"the parent's weights alone need {parent.params * parent.bytes / GIB:.1f} GiB on the device"
    common: dict[str, Any] = {
        "name": "prune",
        "compute_dtype": parent.dtype,
        "fallback": {"device": ("parent.dtype", hint + ": load it in bfloat16 or use a larger device")},
    }
    if not calibrated:
        return StageEstimate(
            device=(weights(parent), Term("scores", parent.ffn * parent.hidden * 4, "f x h x 4 B")),
            host=(baseline(),),
            flops=10.0 * parent.linear_params,
            flops_formula="about 10 elementwise FLOP per linear weight",
            **common,
        )
    ids = Term(
        "calibration token ids", cal.n * cal.s * TOKEN_ID_BYTES, f"N x S x 8 B = {cal.n} x {cal.s} x 8"
    )
    mode = CALIBRATION_MODES.get(method, "stream")
    build = {"stream": _streamed, "blocks": _blocks, "sequential": _sequential}[mode]
    stage = build(method, parent, pruned, cal, common)
    extra = ()
    if not sparse and pruned.layers == parent.layers and pruned.params != parent.params:
        extra = (Term("pruned weights", pruned.params * parent.bytes, "P' x b (built beside the parent's)"),)
    return replace(stage, device=(*stage.device, *extra), host=(*stage.host, ids))


def _batch_forward(p: Shape, cal: Calibration) -> Term:
    return Term(
        "batch forward",
        cal.b * cal.s * (4 * p.hidden + 3 * p.ffn) * p.bytes,
        f"B x S x (4h + 3f) x b = {cal.b} x {cal.s} x {4 * p.hidden + 3 * p.ffn} x {p.bytes} (a layer's input, "
        "residual and two norm temporaries; gate, up and their product)",
    )


def _hook_copies(method: str, p: Shape, cal: Calibration) -> Term:
    """The fp32 temporaries a statistics hook builds from one batch's activations."""
    tokens, upcast = cal.b * cal.s, int(p.bytes < 4)
    if method == "shortgpt":  # cosine of fp32 copies of a layer's input and output
        count, width, how = (
            2 * upcast + 2,
            p.hidden,
            f"({2 * upcast} fp32 copies + 2 products) x B x S x h x 4 B",
        )
    elif method in ("wanda", "sparsegpt"):  # the input in fp32 (and, for wanda, its square)
        count = upcast + (method == "wanda")
        width, how = max(p.hidden, p.ffn), f"{count} x B x S x max(h, f) x 4 B"
    else:  # running sums over chunks of 2048 tokens: an fp32 copy and its square
        count, tokens, width = 2, min(tokens, 2048), max(p.hidden, p.ffn)
        how = "2 x min(B x S, 2048) x max(h, f) x 4 B (fp32 chunk and its square)"
    return Term("statistics copies", count * tokens * width * 4, how)


def _streamed(
    method: str, p: Shape, pruned: Shape, cal: Calibration, common: dict[str, Any]
) -> StageEstimate:
    return StageEstimate(
        device=(weights(p), _batch_forward(p, cal), _hook_copies(method, p, cal)),
        host=(baseline(),),
        flops=cal.n * cal.s * p.forward_flops(cal.s, decoder_only=True),
        flops_formula="N x S x decoder forward (one streamed pass; memory of one batch, whatever N)",
        knobs=(Knob("device", "calibration.batch_size", cal.b, ("batch forward", "statistics copies")),),
        **common,
    )


def _blocks(method: str, p: Shape, pruned: Shape, cal: Calibration, common: dict[str, Any]) -> StageEstimate:
    keep = pruned.layers  # candidates resume after their block: keep x (keep + 1) / 2 layer runs
    slice_elements = min(LOGIT_SLICE_ELEMENTS, cal.b * (cal.s - 1) * p.vocab)
    trace = Term(
        "decoder trace",
        (p.layers + 1) * cal.b * cal.s * p.hidden * p.bytes,
        f"(L + 1) x B x S x h x b = {p.layers + 1} x {cal.b} x {cal.s} x {p.hidden} x {p.bytes}",
    )
    logits = Term("logit slice", slice_elements * (p.bytes + 8), "min(2^26, B x S x V) x (b + 4 fp32 + 4) B")
    layer = 2 * p.layer_params + 2 * cal.s * p.q_width
    head = 2 * p.vocab * p.hidden
    per_token = p.forward_flops(cal.s, decoder_only=True) + keep * (keep + 1) // 2 * layer + (keep + 2) * head
    return StageEstimate(
        device=(weights(p), trace, _batch_forward(p, cal), logits),
        host=(baseline(),),
        flops=cal.n * cal.s * per_token,
        flops_formula=(
            f"N x S x (decoder forward + {keep}x{keep + 1}/2 layer forwards after the candidate blocks + "
            f"{keep + 2} LM heads)"
        ),
        knobs=(Knob("device", "calibration.batch_size", cal.b, ("decoder trace", "batch forward")),),
        **common,
    )


def _sequential(
    method: str, p: Shape, pruned: Shape, cal: Calibration, common: dict[str, Any]
) -> StageEstimate:
    h = p.hidden
    batch = cal.b * cal.s * h * p.bytes
    total = cal.batches * batch
    held = total if cal.budget is None else min(total, cal.budget // batch * batch)
    budget = "no budget" if cal.budget is None else f"budget {cal.budget:,} B"
    device = [
        weights(p),
        Term(
            "calibration activations",
            held,
            f"N x S x h x b = {cal.n} x {cal.s} x {h} x {p.bytes}, up to the {budget}",
        ),
        _batch_forward(p, cal),
        _hook_copies(method, p, cal),
    ]
    flops = 2 * cal.n * cal.s * p.forward_flops(cal.s, decoder_only=True)
    formula = "2 x N x S x decoder forward (statistics, then the pruned layer's outputs)"
    if method == "sparsegpt":
        terms, extra_flops, extra_formula = _sparsegpt_terms(p, cal)
        device += terms
        flops += extra_flops
        formula += extra_formula
    spilled = DiskTerm(
        "spilled activations", total - held, "N x S x h x b beyond the budget", True, TEMP, "spill"
    )
    disk = () if held == total else (spilled,)
    return StageEstimate(
        device=tuple(device),
        host=(baseline(),),
        disk=disk,
        flops=flops,
        flops_formula=formula,
        knobs=(
            Knob(
                "device",
                "prune.options.max_activation_bytes",
                held,
                ("calibration activations",),
                " (the rest spills to files under $TMPDIR)",
            ),
            Knob("device", "calibration.batch_size", cal.b, ("batch forward", "statistics copies")),
        ),
        **common,
    )


def _sparsegpt_terms(p: Shape, cal: Calibration) -> tuple[list[Term], int, str]:
    """SparseGPT's per-layer Hessians and inverse, and the FLOPs of building and sweeping them."""
    h, f, q, kv = p.hidden, p.ffn, p.q_width, p.kv_width
    hessians = 2 * h * h + q * q + f * f
    terms = [
        Term("Hessians", hessians * 4, "(2h^2 + q^2 + f^2) x 4 B (fp32, one layer)"),
        Term("inverse Hessian", 2 * f * f * 4, "2 x f^2 x 4 B (Cholesky factor of the largest)"),
    ]
    sweeps = 2 * (h * h * (q + 2 * kv + 2 * f) + h * q * q + h * f * f) + 2 * h**3 + q**3 + f**3
    flops = 2 * cal.n * cal.s * p.layers * hessians + p.layers * sweeps
    formula = " + 2 x N x S x L x (2h^2 + q^2 + f^2) (Hessians) + L x (2 x sum out x in^2 + sum in^3) (OBS)"
    return terms, flops, formula
