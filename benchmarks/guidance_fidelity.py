"""How much guidance a guidance-distilled student really applies, step by step along the teacher's own trajectory.

FID says *that* a student misses; this says *where*. The teacher samples with DDIM and CFG at w (its guided
trajectory: the states a sampler visits); at every step the student, asked for the same w, is compared with the
teacher's guided output there. Per step it reports the MSE to that target, and the student's **effective w** — the
least-squares w* for which ``uncond + w*·(cond − uncond)`` best fits the student's output — with the error left
after that fit (what no choice of w explains). A faithful student has w* ≈ w at every step.

    HF_HUB_OFFLINE=1 python benchmarks/guidance_fidelity.py [--models tiny-sd tiny-dit] [--student FOLDER ...]
        [--samples 64] [--steps 20] [--w 4]

Without ``--student`` it measures every shipped guidance student of each model (LoRA and full); ``--student``
names student folders (``effdiff distill … --out FOLDER``) of the first model instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import effdiff
from effdiff.distill.store import RECORD, default_output, student_folder
from effdiff.distill.teacher import alpha_at, combine_guidance, ddim_step, guidance_halves, student_timesteps
from effdiff.distill.trainer import FORMS, denoiser_call, training_data
from effdiff.host import cpu_description
from effdiff.zoo.train import caption_of

METHOD = "guidance-distill"


def students_of(model: str, given: list[str]) -> list[tuple[str, str]]:
    """(label, recipe) for each student to measure; a given folder's form is the one its record says."""
    if given:
        return [(folder, f"{METHOD}:form={json.loads((Path(folder) / RECORD).read_text())['form']},path={folder}")
                for folder in given]
    return [(student_folder(METHOD, form), f"{METHOD}:form={form}") for form in FORMS
            if default_output(model, student_folder(METHOD, form)).is_dir()]


@torch.no_grad()
def profile(model: str, recipe: str, samples: int, steps: int, w: float, seed: int = 1) -> list[dict]:
    """One row per step of the teacher's guided DDIM trajectory: t, MSE, effective w, residual."""
    teacher_pipe, student_pipe = effdiff.load(model), effdiff.load(model)
    effdiff.accelerate(student_pipe, recipe)
    student_pipe.effdiff.methods[0].embedding.scale = torch.tensor([w])
    is_dit = teacher_pipe.denoiser_name == "transformer"
    teacher = denoiser_call(teacher_pipe.denoiser.eval(), is_dit)
    student = denoiser_call(student_pipe.denoiser.eval(), is_dit)
    images, labels, per_digit, uncond = training_data(torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    text = caption_of(labels[torch.randint(0, len(labels), (samples,), generator=gen)], per_digit, gen)
    alphas = teacher_pipe.scheduler.alphas_cumprod.float()
    prediction_type = teacher_pipe.scheduler.config.prediction_type
    sample = torch.randn((samples, *images.shape[1:]), generator=gen)
    rows = []
    for t in student_timesteps(steps, len(alphas)):
        now = t.expand(samples)
        unconditional, conditional = guidance_halves(teacher, sample, now, text, uncond)
        target = combine_guidance(unconditional, conditional, w)
        output = student(sample, now, text)
        direction = conditional - unconditional
        effective = float(((output - unconditional) * direction).sum() / direction.pow(2).sum())
        residual = output - (unconditional + effective * direction)
        rows.append({"t": int(t), "mse": float((output - target).pow(2).mean()), "effective_w": round(effective, 3),
                     "residual_mse": float(residual.pow(2).mean()),
                     "direction_ms": float(direction.pow(2).mean())})
        sample = ddim_step(target, sample, alpha_at(alphas, now, 1.0),
                           alpha_at(alphas, now - len(alphas) // steps, 1.0), prediction_type)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--student", nargs="*", default=[], help="student folders of the first model")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--w", type=float, default=4.0)
    parser.add_argument("--out", default="benchmarks/results/guidance_fidelity.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"benchmark": "guidance_fidelity", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": f"{cpu_description()} threads={torch.get_num_threads()}",
              "torch": torch.__version__, "samples": args.samples, "steps": args.steps, "w": args.w, "students": []}
    for index, model in enumerate(args.models):
        for label, recipe in students_of(model, args.student if index == 0 else []):
            rows = profile(model, recipe, args.samples, args.steps, args.w)
            result["students"].append({"model": model, "student": label, "recipe": recipe, "steps": rows})
            print(f"== {model} {label}: effective w (asked {args.w:g}) / MSE by t")
            print("  " + "  ".join(f"t{r['t']}: {r['effective_w']:.2f}/{r['mse']:.4f}" for r in rows[::3]),
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
