"""runtime/vae_cogvideox.py against diffusers' AutoencoderKLCogVideoX.decode (tiny random VAEs)."""
import pytest
import torch

from ditbake.runtime import vae_cogvideox
from ditbake.runtime.errors import InputError
from tests.runtime.component_checks import assert_close, fresh_seed

diffusers = pytest.importorskip("diffusers")


def _tiny(seed: int):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1,
                                            norm_num_groups=4, temporal_compression_ratio=4,
                                            down_block_types=("CogVideoXDownBlock3D",) * 3,
                                            up_block_types=("CogVideoXUpBlock3D",) * 3).eval()


# 1 frame (an image), 5 (odd: a first batch of 3, then 2), 4 (even: batches of 2, as CogVideoX 1.5)
@pytest.mark.parametrize("frames", [1, 5, 4])
def test_decode_matches_diffusers(frames):
    seed = fresh_seed()
    vae = _tiny(seed)
    cfg = dict(vae.config)
    z = torch.randn(2, 4, frames, 3, 5, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        ours = vae_cogvideox.decode(dict(vae.state_dict()), cfg, z)
    assert ours.shape == (2, 3, {1: 1, 5: 17, 4: 16}[frames], 12, 20)
    assert_close(ours, ref, f"CogVideoX decode, {frames} latent frames", seed)


def test_frame_batches_and_helpers():
    assert vae_cogvideox.frame_batches(13) == [(0, 3)] + [(i, i + 2) for i in range(3, 13, 2)]
    assert vae_cogvideox.frame_batches(1) == [(0, 3)]  # slicing past the end: the single frame
    assert vae_cogvideox.frame_batches(4) == [(0, 2), (2, 4)]
    cfg = dict(_tiny(0).config)
    assert vae_cogvideox.scale_factors(cfg) == (4, 4) and vae_cogvideox.latent_channels(cfg) == 4
    with pytest.raises(InputError, match="latents"):
        vae_cogvideox.decode(dict(_tiny(0).state_dict()), cfg, torch.zeros(1, 4, 4, 4))
