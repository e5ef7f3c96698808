"""runtime/vae_kl.py against diffusers' AutoencoderKL.decode (tiny random VAEs)."""
import pytest
import torch

from ditbake.runtime import vae_kl
from ditbake.runtime.errors import InputError
from tests.runtime.component_checks import assert_close, fresh_seed

diffusers = pytest.importorskip("diffusers")


def _tiny(seed: int, post_quant: bool, blocks=(8, 16, 16)):
    torch.manual_seed(seed)
    n = len(blocks)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks,
                                  down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                  layers_per_block=1, norm_num_groups=4, use_quant_conv=post_quant,
                                  use_post_quant_conv=post_quant, sample_size=16)
    return vae.eval()


@pytest.mark.parametrize("post_quant", [True, False])  # SD1-style / SD3 and Flux (no post_quant_conv)
def test_decode_matches_diffusers(post_quant):
    seed = fresh_seed()
    vae = _tiny(seed, post_quant)
    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        ours = vae_kl.decode(dict(vae.state_dict()), dict(vae.config), z)
    assert ours.shape == (2, 3, 20, 24)
    assert_close(ours, ref, f"AutoencoderKL decode (post_quant_conv={post_quant})", seed)
    assert vae_kl.scale_factors(dict(vae.config)) == (4, 1) and vae_kl.latent_channels(dict(vae.config)) == 4


def test_wrong_latent_shape_is_refused():
    vae = _tiny(0, False)
    with pytest.raises(InputError, match="latents"):
        vae_kl.decode(dict(vae.state_dict()), dict(vae.config), torch.zeros(1, 3, 4, 4))
