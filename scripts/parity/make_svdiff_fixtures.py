#!/usr/bin/env python3
"""Reference tensors for services/engine/tests/train_svdiff.rs, computed with svdiff-pytorch's
layers on the tiny diffusers model (services/engine/fixtures/tiny-sd).

Run by a developer (not by CI), in the venv of make_fixtures.py plus svdiff-pytorch. Its package
pins diffusers 0.14 and its `__init__` imports model copies written for that version, so it is
installed without dependencies and only its `layers.py` (SVDLinear, SVDConv2d, SVDEmbedding,
SVDLayerNorm, SVDGroupNorm) is used, swapped into the current diffusers/transformers models the
way its `UNet2DConditionModelForSVDiff` / `CLIPTextModelForSVDiff` use them:

    pip install einops && pip install --no-deps svdiff-pytorch==0.2.0
    SIDBOOTH_WRITE_FIXTURES=1 cargo nextest run -p sidbooth-engine --test train_svdiff \
        trained_output_is_the_committed_export      # writes fixtures/svdiff/export (our output)
    python scripts/parity/make_svdiff_fixtures.py

Writes services/engine/fixtures/svdiff/reference.safetensors:
  svd.<component>.<weight>.S     torch.linalg.svd singular values of every shifted weight
  batch.*                        a fixed batch (latents, noise, timesteps; one instance and one
                                 class example, captions in the metadata)
  <case>.loss, <case>.grad_norm  of one training step, case `unet` or `unet_te`; `<case>_svd64`
                                 is the same step with the layers' SVD evaluated in float64
                                 (and rounded to float32, as the engine does): the reference's
                                 float32 SVD alone moves some gradients by about 1e-4 of their
                                 tensor's largest, which the script prints
  <case>.grad.<component>.<key>  the gradients of the shifts after clipping
  <case>.delta.<component>.<key> the shifts after one AdamW step (lr 1e-3, 1-D shifts 1e-6)
  sample.*                       DDIM sampling from fixed latents with the base model and with
                                 fixtures/svdiff/export loaded as svdiff-pytorch's loaders do
The metadata lists each case's 1-D shifts (train_svdiff.py's "norm" group) as JSON.

With --check-merged OUT it instead checks an output written with the merged pipeline (too large
to commit), e.g.

    cargo run -p sidbooth-cli -- train --model services/engine/fixtures/tiny-sd \
        --images examples/dog6 --class dog --method svdiff --train-text-encoder --steps 3 \
        --resolution 32 --settings '{"merged_pipeline": true}' --output OUT
    python scripts/parity/make_svdiff_fixtures.py --check-merged OUT

diffusers' `from_pretrained` on OUT/merged_pipeline must sample what OUT's shifts sample through
svdiff-pytorch's layers.
"""
import argparse
import contextlib
import importlib.util
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "services", "engine", "fixtures")
MODEL = os.path.join(FIX, "tiny-sd")
OUT = os.path.join(FIX, "svdiff")
EXPORT = os.path.join(OUT, "export")

torch.set_num_threads(max(1, os.cpu_count() or 1))


def svdiff_layers():
    """svdiff_pytorch/layers.py, without importing the package (see the module docstring)."""
    spec = importlib.util.find_spec("svdiff_pytorch")
    if spec is None:
        raise SystemExit("pip install --no-deps svdiff-pytorch==0.2.0 (and einops)")
    path = os.path.join(spec.submodule_search_locations[0], "layers.py")
    s = importlib.util.spec_from_file_location("svdiff_layers", path)
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    return m


L = svdiff_layers()


def svd_version(m, embeddings):
    """The svdiff-pytorch layer for `m` with its weights, or None for layers without weights."""
    if isinstance(m, nn.Linear):
        new = L.SVDLinear(m.in_features, m.out_features, bias=m.bias is not None)
    elif isinstance(m, nn.Conv2d):
        assert m.kernel_size[0] == m.kernel_size[1]
        new = L.SVDConv2d(m.in_channels, m.out_channels, m.kernel_size[0], stride=m.stride,
                          padding=m.padding, dilation=m.dilation, groups=m.groups,
                          bias=m.bias is not None)
    elif isinstance(m, nn.GroupNorm) and m.affine:
        new = L.SVDGroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=True)
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        new = L.SVDLayerNorm(m.normalized_shape[0], eps=m.eps, elementwise_affine=True,
                             bias=m.bias is not None)
    elif embeddings and isinstance(m, nn.Embedding):
        new = L.SVDEmbedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
    else:
        return None
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if getattr(m, "bias", None) is not None:
            new.bias.copy_(m.bias)
    # As after svdiff-pytorch's loaders: the SVD is taken at the first forward, of these weights.
    new.done_svd = False
    return new


def svdiff_key(model, name):
    """The name svdiff-pytorch gives a parameter: its CLIPTextModel copy (transformers 4) keeps the
    layers under `text_model.`, which transformers 5's CLIPTextModel no longer has."""
    if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model"):
        return f"text_model.{name}"
    return name


def to_svdiff(model, embeddings):
    """Swaps every weighted layer for its SVD version (as the reference's model copies do: the
    UNet's linears, convolutions and norms; the text encoder's linears, norms and embeddings)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = svd_version(child, embeddings)
            if new is not None:
                setattr(parent, name, new)
    plain = [n for n, p in model.named_parameters() if n.endswith(".weight")
             and not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), SVD_TYPES)]
    assert not plain, f"weights without spectral shifts: {plain}"
    model.requires_grad_(False)
    deltas = {svdiff_key(model, n): p for n, p in model.named_parameters() if n.endswith(".delta")}
    for p in deltas.values():
        p.requires_grad_(True)
    return deltas


SVD_TYPES = (L.SVDLinear, L.SVDConv2d, L.SVDGroupNorm, L.SVDLayerNorm, L.SVDEmbedding)


def load_shifts(model, path):
    """What `load_unet_for_svdiff` / `load_text_encoder_for_svdiff` do with the file: every key
    must name a shift of the model."""
    params = {svdiff_key(model, n): p for n, p in model.named_parameters()}
    for k, v in load_file(path).items():
        assert k in params, f"{k} is no parameter of the model"
        with torch.no_grad():
            params[k].copy_(v)


def singular_values(ref):
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    te = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    for comp, model in (("unet", unet), ("text_encoder", te)):
        for n, p in model.named_parameters():
            if n.endswith(".weight"):
                w = p.detach().unsqueeze(0) if p.ndim == 1 else p.detach().reshape(p.shape[0], -1)
                ref[f"svd.{comp}.{svdiff_key(model, n)}.S"] = torch.linalg.svd(w, full_matrices=False).S.contiguous()


CAPTIONS = ["a photo of sks dog", "a photo of dog"]


@contextlib.contextmanager
def float64_svd():
    """Evaluates torch.linalg.svd in float64, returning the input's dtype."""
    orig = torch.linalg.svd

    def svd(a, full_matrices=True):
        return tuple(x.to(a.dtype) for x in orig(a.double(), full_matrices=full_matrices))

    torch.linalg.svd = svd
    try:
        yield
    finally:
        torch.linalg.svd = orig


def svd_precision_effect(ref, case):
    worst = max((((ref[k] - ref[k.replace(case, f"{case}_svd64", 1)]).abs().max()
                  / ref[k].abs().max()).item(), k)
                for k in ref if k.startswith(f"{case}.grad."))
    print(f"{case}: float32 vs float64 SVD in the reference moves the gradients by up to "
          f"{worst[0]:.2e} relative ({worst[1]})")


def training_step(case, train_text_encoder, batch, ref, meta):
    """One step of svdiff-pytorch's train_svdiff.py (prior preservation, batch of one instance and
    one class example) on a fixed batch."""
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    te = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    shifts = {f"unet.{k}": p for k, p in to_svdiff(unet, embeddings=False).items()}
    te.requires_grad_(False)
    if train_text_encoder:
        shifts.update({f"text_encoder.{k}": p for k, p in to_svdiff(te, embeddings=True).items()})
    one_d = sorted(n for n in shifts if "norm" in n)
    meta[f"{case}.one_d"] = json.dumps(one_d)
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in shifts.items() if n not in one_d]},
         {"params": [shifts[n] for n in one_d], "lr": 1e-6}],
        lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    x0, noise, t = batch["batch.x0"], batch["batch.noise"], batch["batch.timesteps"]
    noisy = sched.add_noise(x0, noise, t)
    hidden = te(ids)[0]
    pred = unet(noisy, t, hidden).sample
    p, p_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(noise, 2, dim=0)
    loss = F.mse_loss(p.float(), target.float()) + 1.0 * F.mse_loss(p_prior.float(), target_prior.float())
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(shifts.values()), 1.0)
    opt.step()
    ref[f"{case}.loss"] = loss.detach().reshape(1)
    ref[f"{case}.grad_norm"] = norm.detach().reshape(1)
    for n, p in shifts.items():
        ref[f"{case}.grad.{n}"] = p.grad.detach().clone()
        ref[f"{case}.delta.{n}"] = p.detach().clone()
    print(f"{case}: loss {loss.item():.6f}, grad norm {norm.item():.4f}, {len(shifts)} shifts "
          f"({len(one_d)} 1-D)")


SAMPLE = dict(prompt="a photo of sks dog", negative_prompt="blurry", num_inference_steps=5,
              guidance_scale=7.5, height=32, width=32)


def sampling(ref, g):
    """DDIM sampling from fixed latents, before and after loading our exported shifts."""
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    init = torch.randn((1, 4, 16, 16), generator=g)
    ids = pipe.tokenizer([SAMPLE["prompt"]], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref["sample.init_latents"] = init
        ref["sample.base"] = pipe(output_type="latent", latents=init.clone(), **SAMPLE).images
        to_svdiff(pipe.unet, embeddings=False)
        to_svdiff(pipe.text_encoder, embeddings=True)
        load_shifts(pipe.unet, os.path.join(EXPORT, "spectral_shifts.safetensors"))
        load_shifts(pipe.text_encoder, os.path.join(EXPORT, "spectral_shifts_te.safetensors"))
        ref["sample.te_hidden"] = pipe.text_encoder(ids)[0]
        ref["sample.shifted"] = pipe(output_type="latent", latents=init.clone(), **SAMPLE).images
        for m in pipe.text_encoder.modules():
            if isinstance(m, SVD_TYPES):
                m.set_scale(0.5)
        ref["sample.te_hidden_half"] = pipe.text_encoder(ids)[0]
    effect = ((ref["sample.shifted"] - ref["sample.base"]).abs().max() / ref["sample.base"].abs().max()).item()
    print(f"sampling: the exported shifts change the latents by {effect:.3e} (relative max)")


def check_merged(out):
    init = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        merged = StableDiffusionPipeline.from_pretrained(os.path.join(out, "merged_pipeline"),
                                                         safety_checker=None, requires_safety_checker=False)
        got = merged(output_type="latent", latents=init.clone(), **SAMPLE).images
        pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
        base = pipe(output_type="latent", latents=init.clone(), **SAMPLE).images
        to_svdiff(pipe.unet, embeddings=False)
        load_shifts(pipe.unet, os.path.join(out, "spectral_shifts.safetensors"))
        te_shifts = os.path.join(out, "spectral_shifts_te.safetensors")
        if os.path.isfile(te_shifts):
            to_svdiff(pipe.text_encoder, embeddings=True)
            load_shifts(pipe.text_encoder, te_shifts)
        want = pipe(output_type="latent", latents=init.clone(), **SAMPLE).images
    err = ((got - want).abs().max() / want.abs().max()).item()
    effect = ((want - base).abs().max() / base.abs().max()).item()
    print(f"merged pipeline vs svdiff-pytorch's layers with the shifts: {err:.2e} relative; "
          f"effect of the shifts {effect:.2e}")
    assert err <= 1e-4 and effect > 1e-3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check-merged", metavar="OUT")
    a = p.parse_args()
    if a.check_merged:
        return check_merged(a.check_merged)
    if not os.path.isfile(os.path.join(EXPORT, "spectral_shifts_te.safetensors")):
        raise SystemExit(f"{EXPORT} lacks the exported shifts: run the Rust test first (see the docstring)")
    ref, meta = {}, {}
    singular_values(ref)
    g = torch.Generator().manual_seed(2024)
    batch = {
        "batch.x0": torch.randn((2, 4, 16, 16), generator=g),
        "batch.noise": torch.randn((2, 4, 16, 16), generator=g),
        "batch.timesteps": torch.tensor([118, 806], dtype=torch.int64),
    }
    ref.update(batch)
    meta["batch.captions"] = json.dumps(CAPTIONS)
    for case, te in (("unet", False), ("unet_te", True)):
        training_step(case, te, batch, ref, meta)
        with float64_svd():
            training_step(f"{case}_svd64", te, batch, ref, meta)
        svd_precision_effect(ref, case)
    sampling(ref, g)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "reference.safetensors")
    save_file({k: v.contiguous() for k, v in ref.items()}, path, metadata=meta)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
