"""Generate the zoo's 1,000 evaluation samples for trained exports on a machine without MiniLM.

The evaluation prompts are training captions, so their MiniLM states come from the caption cache.
Usage: python tools/gpu_sample.py EXPORT_DIR {tiny-sd,tiny-dit} OUT.pt [--device cuda]
"""

import sys

import torch

from effdiff.zoo.captions import caption_states
from effdiff.zoo.evaluate import generate_eval_samples
from effdiff.zoo.load import _from_folder

folder, kind, out = sys.argv[1:4]
device = sys.argv[5] if len(sys.argv) > 5 else "cuda"
pipe = _from_folder(__import__("pathlib").Path(folder), kind, None, None).to(device)
pipe._caption_cache.update(caption_states())
images, labels = generate_eval_samples(pipe, batch=1000)
torch.save({"images": ((images + 1) * 127.5).round().to(torch.uint8), "labels": labels}, out)
print(kind, "samples", images.shape)
