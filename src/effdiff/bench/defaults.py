"""What ``effdiff bench`` runs when not told: the bundled models and one recipe per method family.

The curated list names each family's representative setting and a few stacks; any registered family
the list does not cover yet gets its first method with default parameters, so a new family is
benchmarked as soon as it is registered.
"""

from __future__ import annotations

from effdiff.recipe import split
from effdiff.registry import all_methods

DEFAULT_MODELS = ("tiny-sd", "tiny-dit")

# The default run shows each family's best on the bundled models within 15 minutes on 2 cores; `--full` adds the
# rest of the curated list (about twice as long). Slow to set up or to run, so measured by the scripts in
# benchmarks/ instead: `ays` (up to 110 s of search), `l2c` (trains a router), `qdiffusion`/`svdquant`/`ptq`
# (simulated, slower than fp32). `bf16` and `int8` are refused with the reason where the CPU lacks the kernels.
DEFAULT = (
    "unipc:steps=10",
    "deepcache:interval=3",
    "taylorseer",
    "bf16",
    "dpmpp2m:steps=20+deepcache:interval=3",
    "lcm:steps=4",  # the bundled models ship their LCM-LoRAs (effdiff distill)
    "lcm:steps=4+int8",
    "progressive:steps=4",  # and their progressive students (8 → 4 → 2 → 1 steps)
    "rectflow",  # and their one-step rectified-flow students (InstaFlow)
    "dpmpp2m:steps=20+diffpruning+deepcache:interval=3",  # the shipped pruned denoiser (effdiff compress) stacked
    "dpmpp2m:steps=20+guidance-distill+deepcache:interval=3",  # the w-conditioned student: one pass per step
)
# Token merging is --full only: on the 32-px bundled models it never pays (0.90× on tiny-sd, 0.78× on tiny-dit,
# run 20261204-181735-bce64c) while its 50-step samples make it the default run's most expensive row (3.4 min).
FULL_ONLY = (
    "tome:ratio=0.5,max_downsample=2",  # tiny-sd's attention starts at downsample 2
    "dpmpp2m:steps=20",
    "fbcache",  # dynamic: the row the cost-vs-quality work check was made for
    "faster",
    "int8",  # convs too where the CPU has VNNI; the rule keeps layers narrower than 128 features in fp32
    "dpmpp2m:steps=20+fbcache",
    "dpmpp2m:steps=20+deepcache:interval=3+tome:ratio=0.5,max_downsample=2",
    # torch.compile: 1.00x / 0.98x on the bundled models in run 20261205-081244-760c12 (AVX512 host), 1.50x / 1.55x
    # in run 20261207-064821-e38944 (AVX2 host; benchmarks/results/bench_compile_timing_20261207.json; per call
    # 1.3-1.6x, benchmarks/compile_per_call.py); its compilation adds a minute or two per model to the default run
    "compile",
    "guidance-distill",  # 50 DDIM steps at one call each: what guidance distillation alone buys
    "diffpruning",  # the pruned denoiser alone (50 % of the MACs)
    "laptop",  # tiny-sd's layer-pruned denoiser (70 % of the MACs; none shipped for tiny-dit)
    "bksdm:variant=tiny",  # tiny-sd without its mid-block and innermost stage (BK-SDM; a U-Net method)
    "ditprune",  # tiny-dit keeping 4 of its 8 blocks by TinyFusion's learned mask (a DiT method)
    "todo:factor=2",  # ToDo's keys/values downsampled at the first attention level
    "dmd",  # the one-step generator of distribution matching distillation (the default run shows rectflow's)
)


def default_models() -> list[str]:
    return list(DEFAULT_MODELS)


def _method_names(recipe: str) -> list[str]:
    return [part.split(":", 1)[0].strip() for part in split(recipe)]


def default_recipes(full: bool = False) -> list[str]:
    """Curated recipes whose methods are all registered, plus one per family that neither list covers yet."""
    methods = all_methods()
    curated = DEFAULT + FULL_ONLY if full else DEFAULT
    recipes = [r for r in curated if all(name in methods for name in _method_names(r))]
    covered = {methods[name].family for r in DEFAULT + FULL_ONLY for name in _method_names(r) if name in methods}
    for name, cls in sorted(methods.items()):
        if cls.family not in covered:
            recipes.append(name)
            covered.add(cls.family)
    return recipes
