"""Caption embeddings for training: each distinct caption is encoded once and cached on disk.

Training then needs neither MiniLM nor transformers (the GPU machine has neither wheel installed).
"""

from __future__ import annotations

import torch

from effdiff.zoo.data import NUM_CLASSES, all_captions, cache_dir, captions_for


def caption_states() -> dict[str, torch.Tensor]:
    """{caption: (MAX_TOKENS, TEXT_DIM) fp32} for every training caption, the empty one included."""
    path = cache_dir() / "caption_states.pt"
    if path.exists():
        return torch.load(path)
    from effdiff.zoo.text import encode_captions, load_text_encoder

    encoder, tokenizer = load_text_encoder()
    captions = all_captions()
    states = encode_captions(captions, encoder, tokenizer)
    table = {c: s.clone() for c, s in zip(captions, states, strict=True)}
    torch.save(table, path)
    return table


def caption_bank(table: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-digit caption states (10, T, L, D), unconditional states (L, D)) for fast sampling."""
    per_digit = torch.stack([torch.stack([table[c] for c in captions_for(d)]) for d in range(NUM_CLASSES)])
    return per_digit, table[""]
