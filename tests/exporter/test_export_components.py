"""exporter/components.py: component weights and configs survive safetensors + JSON and run in the runtime."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditbake.exporter.components import component_weights, export_tokenizer
from ditbake.runtime import components
from ditbake.runtime.errors import InputError
from tests.runtime.component_checks import assert_close, fresh_seed

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


def _roundtrip(tmp_path, module):
    config, weights = component_weights(module)
    save_file(weights, str(tmp_path / "w.safetensors"))  # refuses shared storage: aliases must be gone
    (tmp_path / "c.json").write_text(json.dumps(config))
    return json.loads((tmp_path / "c.json").read_text()), load_file(str(tmp_path / "w.safetensors"))


def test_t5_tied_embedding_stored_once_and_runs(tmp_path):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24,
                                                                  num_layers=2, num_heads=4)).eval()
    config, weights = _roundtrip(tmp_path, model)
    assert "shared.weight" in weights and "encoder.embed_tokens.weight" not in weights
    kind = components.kind_for_class(config["_class_name"])
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = components.TEXT_ENCODERS[kind].encode(weights, config, ids, mask)
    assert_close(ours, ref, "umt5 after export", seed)


def test_vae_config_and_weights_roundtrip(tmp_path):
    seed = fresh_seed()
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    # post_quant_conv present (default): it must survive the decoder filter
    config, weights = _roundtrip(tmp_path, vae)
    module = components.VAE_DECODERS[components.kind_for_class(config["_class_name"])]
    z = torch.randn(1, module.latent_channels(config), 3, 4)
    with torch.no_grad():
        ours = module.decode(components.decoder_weights(weights), config, z)
        assert_close(ours, vae.decode(z, return_dict=False)[0], "kl after export", seed)
    assert not any(k.startswith("encoder.") for k in components.decoder_weights(weights))


def test_tokenizer_without_pad_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1},
                                                                                           unk_token="[UNK]")))
    with pytest.raises(InputError, match="pad token"):
        export_tokenizer(tok, tmp_path, 8)
