"""runtime/vae_wan.py against diffusers' AutoencoderKLWan.decode (tiny random VAEs, frame-chunked cache)."""
import pytest
import torch

from ditbake.runtime import vae_wan
from ditbake.runtime.errors import InputError
from tests.runtime.component_checks import assert_close, fresh_seed

diffusers = pytest.importorskip("diffusers")


def _wan21(seed: int):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                      latents_std=[1.0] * 4).eval()


def _wan22(seed: int):
    """Wan 2.2's layout: residual up blocks with the DupUp3D shortcut, patch size 2, own decoder width."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True], is_residual=True, in_channels=12,
                                      out_channels=12, patch_size=2, scale_factor_spatial=8, scale_factor_temporal=2,
                                      latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


@pytest.mark.parametrize("make,frames", [(_wan21, 1), (_wan21, 3), (_wan22, 4)])
def test_decode_matches_diffusers(make, frames):
    seed = fresh_seed()
    vae = make(seed)
    cfg = dict(vae.config)
    z = torch.randn(2, 4, frames, 4, 5, generator=torch.Generator().manual_seed(seed)) * 0.5
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        ours = vae_wan.decode(dict(vae.state_dict()), cfg, z)
    spatial, temporal = vae_wan.scale_factors(cfg)
    assert ours.shape == (2, 3, 1 + temporal * (frames - 1), 4 * spatial, 5 * spatial)
    assert_close(ours, ref, f"{make.__name__} decode, {frames} latent frames", seed)
    assert (ref.abs() < 1).float().mean() > 0.5  # the clamp does not hide the comparison


def test_helpers_and_wrong_shape():
    cfg = dict(_wan21(0).config)
    assert vae_wan.scale_factors(cfg) == (8, 4) and vae_wan.latent_channels(cfg) == 4
    with pytest.raises(InputError, match="latents"):
        vae_wan.decode(dict(_wan21(0).state_dict()), cfg, torch.zeros(1, 4, 4, 4))


def test_bf16_follows_diffusers_dtypes():
    """In bf16 (how pipelines run the VAE) the same ops in the same dtypes: equal within bf16 rounding."""
    seed = fresh_seed()
    vae = _wan21(seed).to(torch.bfloat16)
    z = (torch.randn(1, 4, 2, 4, 5, generator=torch.Generator().manual_seed(seed)) * 0.5).to(torch.bfloat16)
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        ours = vae_wan.decode(dict(vae.state_dict()), dict(vae.config), z)
    assert_close(ours, ref, "bf16 Wan decode", seed, rel=1e-2)
