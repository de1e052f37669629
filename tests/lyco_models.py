"""Small models and helpers for the network / kohya / interchange / accelerate tests.

* `tiny_unet()`: a diffusers UNet2DConditionModel with two levels (32, 64 channels): Transformer2DModel,
  ResnetBlock2D, Downsample2D, Upsample2D, TimestepEmbedding, conv_in/conv_out -- every class the presets
  name for SD U-Nets -- built in ~20 ms.
* `TinyTextEncoder`: two CLIP-like layers whose blocks are *named* CLIPAttention and CLIPMLP (what the kohya
  presets target), so no transformers install is needed.
* `randomize_(net)`: non-zero values in every adapter parameter (LyCORIS zero-inits one factor, which would
  make every interchange test pass vacuously).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny ops: one intra-op thread is ~10x faster than two on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

UNET_KW = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=16,
    norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def tiny_unet(dtype=torch.float64, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_KW).to(dtype)
    unet.requires_grad_(False)
    return unet


class CLIPAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.heads = 2
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.mlp = CLIPAttention(d), CLIPMLP(d)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TinyTextEncoder(nn.Module):
    """Token ids (B, N) -> hidden states (B, N, d)."""

    def __init__(self, d=32, vocab=50, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(CLIPEncoderLayer(d) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)


def tiny_text_encoder(dtype=torch.float64, seed=0, d=32):
    torch.manual_seed(seed)
    te = TinyTextEncoder(d).to(dtype)
    te.requires_grad_(False)
    return te


def unet_inputs(dtype=torch.float64, seed=7, batch=2, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    t = torch.tensor([10, 600][:batch])
    ctx = torch.randn(batch, 5, 32, generator=g, dtype=dtype)
    return x, t, ctx


def token_ids(seed=8, batch=2, n=5):
    return torch.randint(0, 50, (batch, n), generator=torch.Generator().manual_seed(seed))


def run_unet(unet, inputs):
    x, t, ctx = inputs
    return unet(x, t, ctx).sample


@torch.no_grad()
def randomize_(net, seed=0, scale=0.2, block_scale=0.05):
    """Random non-zero values in every adapter parameter, seeded by (lora_name, param) so two networks get
    the same values whatever their parameter order. Values are fp32-representable, so a LyCORIS loader that
    builds fp32 modules before `.double()` loses nothing."""
    for lora in net.loras:
        for name, p in sorted(lora.named_parameters()):
            g = torch.Generator().manual_seed(seed + _stable_hash(f"{lora.lora_name}.{name}"))
            r = torch.randn(p.shape, generator=g)
            if name == "oft_blocks":
                r = r * block_scale
            elif name == "rescale":
                r = 1 + 0.1 * r
            elif name == "scalar":  # a power of two: files hold w1_a * scalar, which must stay fp32-exact
                r = torch.full_like(r, 0.5)
            else:
                r = r * scale
            p.copy_(r.to(p.dtype))
    return net


def _stable_hash(text):
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) % 1_000_003
    return h


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_same_training(start, init, got, ref, tol):
    """lyfast's training run (`got`, from adapter state `start`) equals LyCORIS's (`ref`, from `init`):
    the same start, losses and final adapter weights within `tol`, and every parameter moved (else the
    comparison would be vacuous). `got`/`ref`: dict(losses=[...], state={key: tensor})."""
    assert set(start) == set(init) and all(torch.equal(start[k], init[k]) for k in init)
    losses, ref_losses = torch.tensor(got["losses"]), torch.tensor(ref["losses"])
    assert rel_err(losses, ref_losses) <= tol, f"losses {got['losses']} vs lycoris {ref['losses']}"
    moved = 0
    for k, want in ref["state"].items():
        err = rel_err(got["state"][k], want)
        assert err <= tol, f"{k}: final weight rel err {err:.3e} > {tol:.0e}"
        moved += not torch.equal(want, init[k])
    assert moved == len(init), "some adapter parameter never moved: the comparison would be vacuous"


def assert_close(actual, expected, tol, what=""):
    err = rel_err(actual.detach().to(torch.float64), expected.detach().to(torch.float64))
    assert err <= tol, f"{what}: max|a-b|/max|b| = {err:.3e} > {tol:.1e}"


def state_shapes(net):
    """{key: shape} of everything the network would save."""
    return {k: tuple(v.shape) for lora in net.loras for k, v in
            ((f"{lora.lora_name}.{k}", v) for k, v in lora.state_dict().items())}


def write_kohya_preset(path, unet_target_module=(), unet_target_name=(), text_encoder_target_module=(),
                       text_encoder_target_name=(), enable_conv=True):
    """A complete kohya preset file. Both libraries keep presets in *class attributes* that a preset only
    overwrites for the keys it has, so a partial preset would inherit whatever an earlier test set."""
    lst = lambda items: "[" + ", ".join(f'"{i}"' for i in items) + "]"  # noqa: E731
    path.write_text(
        f"enable_conv = {str(enable_conv).lower()}\n"
        f"unet_target_module = {lst(unet_target_module)}\nunet_target_name = {lst(unet_target_name)}\n"
        f"text_encoder_target_module = {lst(text_encoder_target_module)}\n"
        f"text_encoder_target_name = {lst(text_encoder_target_name)}\n"
        "exclude_name = []\nuse_fnmatch = false\nmodule_algo_map = {}\nname_algo_map = {}\n")
    return str(path)


def clone(model):
    return copy.deepcopy(model)
