"""``effdiff plan``'s pieces: the meta-device trace counts what the CPU counter counts, with attention as one fused
kernel and DistriFusion's exchanges at every layer that has one; the calibration recovers known constants; the
estimates order as the model says they must; the command prints a table and refuses bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_unet
from diffusers.models.attention_processor import Attention
from torch import nn

from effdiff.cli import USAGE_ERROR, main
from effdiff.eval.cost import count_flops
from effdiff.plan.estimate import estimates, fitted_constants, resolve
from effdiff.plan.hardware import DEVICES, Constants, Measured, calibrate, call_seconds
from effdiff.plan.trace import Kernel, trace_call


def _call(batch: int = 2) -> dict:
    torch.manual_seed(0)
    return {"sample": torch.randn(batch, 1, 8, 8), "timestep": torch.tensor(10),
            "encoder_hidden_states": torch.randn(batch, 4, 16)}


def test_the_trace_counts_the_flops_torchs_counter_counts():
    model, call = tiny_unet(), _call()
    with count_flops() as counted, torch.no_grad():
        model(**call)
    assert trace_call(model, call).flops == counted.flops


def test_attention_is_one_kernel_and_every_exchange_is_recorded():
    model = tiny_unet()
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    calls = []
    for module in attentions:
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    trace = trace_call(model, _call())
    self_attention = [m for m in calls if not m.is_cross_attention]
    assert len(trace.kv_bytes) == 2 * len(self_attention)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert len(trace.halo_bytes_per_edge) == len(convs) - 1  # conv_in reads the latent every rank holds
    assert len(trace.norm_bytes) == sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert trace.output_bytes == 2 * 1 * 8 * 8 * 4


def test_calibration_recovers_known_constants():
    truth = Constants(0.5, 10.0)
    device = DEVICES["h200"]
    small = [Kernel(10**9, 10**6)] * 400  # floor-bound
    large = [Kernel(10**13, 10**9)] * 40  # compute-bound
    measured = [(Measured(name, 512, 1, "float16", call_seconds(k, device, truth), "h200", ""), k)
                for name, k in (("small", small), ("large", large))]
    constants, errors = calibrate(measured)
    assert constants.efficiency == pytest.approx(0.5)
    assert constants.floor_us == pytest.approx(10.0, rel=1e-3)
    assert max(abs(e) for e in errors) < 1e-3


@pytest.fixture(scope="module")
def constants() -> Constants:
    return fitted_constants()[0]


def test_estimates_order_as_the_model_says(constants):
    device, nvlink = resolve("a100", "nvlink")
    _, pcie = resolve("a100", "pcie4")
    fast = {r.method: r for r in estimates("sd15-arch", 1024, 4, device, nvlink, constants)}
    slow = {r.method: r for r in estimates("sd15-arch", 1024, 4, device, pcie, constants)}
    assert fast["one device"].speedup == 1.0
    assert fast["distrifusion"].speedup <= fast["naive patch (distrifusion:exchange=none)"].speedup <= 4
    assert slow["distrifusion"].seconds >= fast["distrifusion"].seconds
    assert fast["cfgparallel"].speedup <= 2


def test_the_command_prints_estimates_and_refuses_bad_input(capsys):
    """The installed entry point once (a subprocess), the refusals in-process (each subprocess costs the imports)."""
    args = ["plan", "--model", "sd15-arch", "--px", "512", "--devices", "2"]
    out = subprocess.run([sys.executable, "-m", "effdiff.cli", *args, "--json"], capture_output=True, text=True,
                         check=True)
    rows = json.loads(out.stdout)
    assert [r["method"] for r in rows][:2] == ["one device", "cfgparallel"]
    for extra, message in ((["--device", "tpu"], "--device must be one of"), (["--px", "500"], "multiple of 64")):
        assert main([*args, *extra]) == USAGE_ERROR
        assert message in capsys.readouterr().err


def test_patch_methods_appear_only_where_the_model_splits(constants):
    device, link = resolve("a100", "nvlink")
    pixart = {r.method: r for r in estimates("pixart-alpha-arch", 2048, 4, device, link, constants)}
    assert {"distrifusion", "pipefusion"} <= set(pixart)
    assert 1 < pixart["pipefusion"].speedup < 4  # M + N - 1 patch-times a step: short of N
    assert "pipefusion" not in {r.method for r in estimates("sd15-arch", 512, 4, device, link, constants)}
    flux = [r.method for r in estimates("flux-dev-arch", 512, 4, device, link, constants)]
    assert flux == ["one device", "seqparallel (Ulysses)", "seqparallel:ring=2 (Ulysses 2 × ring 2)",
                    "seqparallel:ring=4 (ring)"]  # no CFG batch, no patches


def test_an_mmdits_sequence_split_exchanges_its_text_keys_too(constants):
    """FLUX's joint attention makes text and image keys whole: 512 text tokens beside 1,024 image ones at 512 px."""
    device, link = resolve("a100", "nvlink")
    rows = {r.method: r for r in estimates("flux-dev-arch", 512, 4, device, link, constants)}
    tokens = 512 + (512 // 16) ** 2
    # per attention q/k/v/output of a rank's tokens, 3072 wide in fp16: 4 × share × (N − 1) / N bytes
    per_attention = 4 * tokens * 3072 * 2 / 4 * 3 / 4
    assert rows["seqparallel (Ulysses)"].sent_mb == pytest.approx(57 * per_attention / 1e6, rel=1e-6)


def test_sequence_parallel_rows_cost_what_their_collectives_move(constants):
    device, link = resolve("a100", "nvlink")
    rows = {r.method: r for r in estimates("pixart-alpha-arch", 1024, 8, device, link, constants)}
    ulysses, ring = rows["seqparallel (Ulysses)"], rows["seqparallel:ring=8 (ring)"]
    assert ulysses.compute_ms == ring.compute_ms == rows["distrifusion"].compute_ms  # the same 1/N of the work
    assert ring.sent_mb == pytest.approx(4 * ulysses.sent_mb)  # 2·(N−1) shares vs 4·(N−1)/N with N = 8
    assert ulysses.step_ms > ulysses.compute_ms  # all-to-alls are waited for
    assert 1 < ulysses.speedup < 8 and 0 < ring.speedup < ulysses.speedup  # 8 small chunk attentions a layer
    large = {r.method: r for r in estimates("pixart-alpha-arch", 4096, 8, device, link, constants)}
    assert 1 < large["seqparallel:ring=8 (ring)"].speedup < large["seqparallel (Ulysses)"].speedup < 8
    pcie = {r.method: r for r in estimates("pixart-alpha-arch", 1024, 8, device, resolve("a100", "pcie4")[1],
                                           constants)}
    assert pcie["seqparallel (Ulysses)"].speedup < ulysses.speedup  # a slower link, a longer wait


def test_usp_hybrids_sit_between_ulysses_and_ring(constants):
    """Ulysses in groups of U, rings of R across them: what it moves is the two exchanges' shares, and where ring
    alone loses to Ulysses the hybrid lands between them."""
    device, link = resolve("a100", "nvlink")
    rows = {r.method: r for r in estimates("pixart-alpha-arch", 1024, 8, device, link, constants)}
    ulysses, ring = rows["seqparallel (Ulysses)"], rows["seqparallel:ring=8 (ring)"]
    hybrids = [rows["seqparallel:ring=2 (Ulysses 4 × ring 2)"], rows["seqparallel:ring=4 (Ulysses 2 × ring 4)"]]
    share = ulysses.sent_mb / (4 * 7 / 8)  # one of q / k / v / output of a rank's tokens
    assert hybrids[0].sent_mb == pytest.approx(share * (4 * 3 / 4 + 2 * 1))
    assert hybrids[1].sent_mb == pytest.approx(share * (4 * 1 / 2 + 2 * 3))
    assert ring.speedup < hybrids[1].speedup < hybrids[0].speedup < ulysses.speedup
    assert {r.compute_ms for r in (ulysses, ring, *hybrids)} == {ulysses.compute_ms}
