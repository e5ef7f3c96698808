"""runtime/text_t5.py against transformers' T5EncoderModel and UMT5EncoderModel (tiny random modules)."""
import pytest
import torch

from ditbake.runtime import text_t5
from tests.runtime.component_checks import assert_close, fresh_seed

transformers = pytest.importorskip("transformers")


def _tiny(kind: str, ffn: str, seed: int):
    torch.manual_seed(seed)
    common = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, feed_forward_proj=ffn,
                  relative_attention_num_buckets=8, relative_attention_max_distance=12, pad_token_id=0)
    if kind == "t5":
        model = transformers.T5EncoderModel(transformers.T5Config(**common))
    else:
        model = transformers.UMT5EncoderModel(transformers.UMT5Config(**common))
    return model.eval()


def _inputs(seed: int, batch: int = 3, length: int = 20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    for b in range(1, batch):  # right padding of random lengths (row 0 unpadded); lengths > max_distance
        n = int(torch.randint(1, length, (1,), generator=g))
        ids[b, n:] = 0
        mask[b, n:] = 0
    return ids, mask


@pytest.mark.parametrize("kind,ffn", [("t5", "gated-gelu"), ("umt5", "gated-gelu"), ("t5", "relu")])
def test_encode_matches_transformers(kind, ffn):
    seed = fresh_seed()
    model = _tiny(kind, ffn, seed)
    ids, mask = _inputs(seed)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = text_t5.encode(dict(model.state_dict()), model.config.to_dict(), ids, mask)
    assert_close(ours, ref, f"{kind}/{ffn} last_hidden_state", seed)
    # the mask matters: without it the padded rows' keys change the unpadded tokens' states
    unmasked = text_t5.encode(dict(model.state_dict()), model.config.to_dict(), ids, torch.ones_like(mask))
    assert (unmasked[1:] - ref[1:]).abs().max() > 1e-3


def test_umt5_uses_per_layer_bias():
    """UMT5 with layer 0's table copied to every layer equals T5 with the same weights; distinct tables don't."""
    seed = fresh_seed()
    model = _tiny("umt5", "gated-gelu", seed)
    w = dict(model.state_dict())
    cfg = model.config.to_dict()
    ids, mask = _inputs(seed)
    with torch.no_grad():
        per_layer = text_t5.encode(w, cfg, ids, mask)
        shared = text_t5.encode(w, {**cfg, "model_type": "t5"}, ids, mask)
    assert (per_layer - shared).abs().max() > 1e-3
    table = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    copied = {**w, **{table.format(i): w[table.format(0)] for i in range(1, 3)}}
    with torch.no_grad():
        same = text_t5.encode(copied, cfg, ids, mask), text_t5.encode(copied, {**cfg, "model_type": "t5"}, ids, mask)
    assert torch.equal(*same)


def test_half_precision_keeps_wo_in_fp32():
    """Loaded in bf16 with `wo` kept in fp32 (transformers' _keep_in_fp32_modules): same dtypes and values."""
    seed = fresh_seed()
    model = _tiny("umt5", "gated-gelu", seed).to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith(".wo"):
            module.float()
    ids, mask = _inputs(seed)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = text_t5.encode(dict(model.state_dict()), model.config.to_dict(), ids, mask)
    # bf16 has 8 mantissa bits: a few roundings of difference through 3 layers
    assert_close(ours.float(), ref.float(), "bf16 umt5", seed, rel=3e-2)
    assert ours.dtype == ref.dtype == torch.bfloat16
