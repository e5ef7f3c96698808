"""`ditbake run` helpers: profile choice by pixel size, numbered outputs, PNG frames."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ditbake.exporter import run, video
from ditbake.runtime.artifact import Profile
from ditbake.runtime.errors import InputError


def _session(*names):
    profiles = tuple(Profile(n, (4, 2, 8, 8), 8) for n in names)

    def profile(name=None):
        for p in profiles:
            if name is None or p.name == name:
                return p
        raise InputError(name)
    return SimpleNamespace(profiles=profiles, profile=profile)


def test_pick_profile_by_pixels():
    s = _session("480x832x81", "720x1280x81", "f3_h8_w8_t8")
    assert run.pick_profile(s, None, 720, None, None).name == "720x1280x81"
    assert run.pick_profile(s, None, None, None, None).name == "480x832x81"
    assert run.pick_profile(s, "f3_h8_w8_t8", None, None, None).name == "f3_h8_w8_t8"
    with pytest.raises(InputError, match="more than one"):
        run.pick_profile(s, None, None, None, 81)
    with pytest.raises(InputError, match="no shape profile matches 480x832x49"):
        run.pick_profile(s, None, 480, 832, 49)


def test_samples_are_numbered_and_png_holds_the_frames(tmp_path):
    assert video.sample_paths(tmp_path / "a.mp4", 1) == [tmp_path / "a.mp4"]
    assert video.sample_paths(tmp_path / "a.png", 2) == [tmp_path / "a_000.png", tmp_path / "a_001.png"]
    with pytest.raises(InputError):
        video.sample_paths(tmp_path / "a.gif", 1)
    from PIL import Image
    from safetensors.torch import load_file

    frames = torch.rand(2, 3, 4, 6, 3)
    latents = torch.randn(2, 5, 3, 2, 2)
    paths = video.write_samples(frames, latents, tmp_path / "f.png")
    for i, path in enumerate(paths):
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (4, 18, 3)  # three frames side by side
        np.testing.assert_array_equal(pixels[:, 6:12], video.to_uint8(frames[i, 1]))
        torch.testing.assert_close(load_file(str(path.with_name(path.stem + ".latents.safetensors")))["latents"],
                                   latents[i])


def test_mp4_upscales_small_clips_to_even_sizes(tmp_path):
    import av

    clip = (np.random.default_rng(0).random((3, 5, 7, 3)) * 255).astype(np.uint8)
    video.write_mp4(clip, tmp_path / "c.mp4", fps=8, min_side=64)
    with av.open(str(tmp_path / "c.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (65 + 1, 91 + 1, 3)
