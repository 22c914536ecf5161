"""Shared fixtures: tiny random pipelines that build in milliseconds, no downloads, no MiniLM."""

from __future__ import annotations

import os
import zlib
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from torch import nn

from effdiff.zoo.pipelines import TinyDiTPipeline, TinySDPipeline

TEXT_DIM = 16
TOKENS = 4
torch.set_num_threads(1)  # tiny models: threads only contend on the shared cores
MAX_WORKERS = 4  # each worker holds torch, diffusers and its fixtures' models (1-2 GiB); multi-rank tests spawn more


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default addopts): one worker per core this process may run on, at most ``MAX_WORKERS``.
    Every test runs single-threaded, so on the 2-core CI host one process would leave a core idle (18.8 min vs
    12.3 min for the whole suite there); a machine reporting many cores does not get a worker per core."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


class HashTokenizer:
    """Word -> id by CRC32; just enough of the tokenizer interface for ``encode_captions``."""

    def __call__(self, captions, padding=None, max_length=TOKENS, truncation=True, return_tensors="pt"):
        ids = torch.zeros(len(captions), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, caption in enumerate(captions):
            words = caption.split()[:max_length]
            for col, word in enumerate(words):
                ids[row, col] = 1 + zlib.crc32(word.encode()) % 97
                mask[row, col] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


class TinyTextEncoder(nn.Module):
    """Embedding table standing in for MiniLM: returns ``last_hidden_state`` like a BertModel."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, TEXT_DIM)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids) * attention_mask[..., None])


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def tiny_unet() -> UNet2DConditionModel:
    _seeded()
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, cross_attention_dim=TEXT_DIM, attention_head_dim=2,
    ).eval()


def tiny_pixart(num_layers: int = 2, heads: int = 2) -> PixArtTransformer2DModel:
    _seeded()
    return PixArtTransformer2DModel(
        sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=num_layers, num_attention_heads=heads,
        attention_head_dim=4, cross_attention_dim=4 * heads, caption_channels=TEXT_DIM,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False,
    ).eval()


def tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, timestep_spacing="leading")


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sd() -> TinySDPipeline:
    _seeded(1)
    return _finish(TinySDPipeline(tiny_unet(), tiny_scheduler(), TinyTextEncoder(), HashTokenizer()))


def make_tiny_dit(num_layers: int = 2, heads: int = 2) -> TinyDiTPipeline:
    _seeded(1)
    transformer = tiny_pixart(num_layers, heads)
    return _finish(TinyDiTPipeline(transformer, tiny_scheduler(), TinyTextEncoder(), HashTokenizer()))


@pytest.fixture
def tiny_sd() -> TinySDPipeline:
    return make_tiny_sd()


@pytest.fixture
def tiny_dit() -> TinyDiTPipeline:
    return make_tiny_dit()


def make_tiny(kind: str) -> TinySDPipeline | TinyDiTPipeline:
    """The tiny pipeline of one backbone kind ("unet" or "dit")."""
    return make_tiny_sd() if kind == "unet" else make_tiny_dit()


@pytest.fixture(params=["unet", "dit"])
def tiny_pipe(request):
    return make_tiny(request.param)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Calibrations and routers are written to (and read from) a per-test cache, never the user's."""
    monkeypatch.setenv("EFFDIFF_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def fresh_quant_memo():
    """Each test calibrates for itself: the simulated quant methods' in-process memo starts and ends empty."""
    from effdiff.methods.quant.lowbit.base import forget_calibrations

    forget_calibrations()
    yield
    forget_calibrations()


def assert_deterministic_calibration(make_pipe, recipe: str, steps: int | None = None) -> None:
    """Two calibrations from scratch (empty memo, fresh pipeline) store identical tensors in every layer record,
    and, with ``steps``, sample identical images."""
    import effdiff
    from effdiff.methods.quant.lowbit.base import forget_calibrations

    records, outputs = [], []
    for _ in range(2):
        forget_calibrations()
        pipe = make_pipe()
        effdiff.accelerate(pipe, recipe)
        records.append(pipe.effdiff.methods[0].layers)
        if steps is not None:
            outputs.append(sample(pipe, steps=steps))
    first, second = records
    assert first.keys() == second.keys()
    for name, record in first.items():
        theirs = second[name].tensors()
        assert record.tensors().keys() == theirs.keys(), name
        for key, tensor in record.tensors().items():
            assert torch.equal(tensor, theirs[key]), (name, key)
    if outputs:
        assert torch.equal(outputs[0], outputs[1])


def assert_reload_identical(pipe, recipe: str, path, steps: int, before_reload=None) -> tuple:
    """Apply ``recipe``, save its calibration to ``path`` and apply it again from the file (empty memo; after
    ``before_reload()`` if given): the reloaded pipeline samples identical images. Returns the saved and the
    reloaded method, with the pipeline left unpatched."""
    import effdiff
    from effdiff.methods.quant.lowbit.base import forget_calibrations

    effdiff.accelerate(pipe, recipe)
    method = pipe.effdiff.methods[0]
    quantized = sample(pipe, steps=steps)
    method.save(str(path))
    pipe.effdiff.remove()
    forget_calibrations()
    if before_reload is not None:
        before_reload()
    effdiff.accelerate(pipe, f"{recipe},calibration={path}")
    reloaded = pipe.effdiff.methods[0]
    assert torch.equal(sample(pipe, steps=steps), quantized)
    pipe.effdiff.remove()
    return method, reloaded


def no_patches(pipe) -> bool:
    """Nothing effdiff could have left behind: no instance ``forward`` in the denoiser, no pre-hook on it, no
    instance ``step`` on the scheduler."""
    model = denoiser(pipe)
    return (not any("forward" in vars(m) for m in model.modules()) and not model._forward_pre_hooks
            and "step" not in vars(pipe.scheduler))


def denoiser(pipe) -> nn.Module:
    """The pipeline's U-Net or transformer."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def split_cfg_calls(pipe: TinySDPipeline) -> None:
    """Make the pipeline call its denoiser once per CFG half, as pipelines without batched CFG do."""
    inner = type(pipe)._call_denoiser

    def two_calls(x, t, text):
        halves = [inner(pipe, xi, t, ti) for xi, ti in zip(x.chunk(2), text.chunk(2), strict=True)]
        return torch.cat(halves)

    pipe._call_denoiser = two_calls


def sample(pipe, steps: int = 4, seed: int = 0, **kwargs) -> torch.Tensor:
    """A deterministic small generation, as a tensor."""
    kwargs.setdefault("guidance_scale", 3.0)
    generator = torch.Generator().manual_seed(seed)
    return pipe("a handwritten seven", num_inference_steps=steps, generator=generator, output_type="pt",
                **kwargs).images


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server started here (Debian's package), on a Unix socket in a temporary folder; skipped with
    the reason where the server is not installed."""
    import glob
    import os
    import shutil
    import subprocess

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"))  # Debian keeps the server off the PATH
    path = os.pathsep.join([os.environ.get("PATH", ""), *debian])
    initdb, pg_ctl = shutil.which("initdb", path=path), shutil.which("pg_ctl", path=path)
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt install postgresql): the URL store is tested where it is")
    pytest.importorskip("psycopg")
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="effdiff-pg-"))  # pytest's own folders are closed to other users
    data, socket_dir = folder / "data", folder / "socket"
    socket_dir.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root and there is no postgres user to start the server as")
        shutil.chown(folder, "postgres")
        shutil.chown(socket_dir, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    port = 54329
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
                    f"-p {port} -k {socket_dir} -c listen_addresses=''", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={socket_dir}&port={port}"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
