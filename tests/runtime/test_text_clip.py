"""runtime/text_clip.py against transformers' CLIPTextModel / CLIPTextModelWithProjection (tiny random)."""
import pytest
import torch

from ditbake.runtime import text_clip
from tests.runtime.component_checks import assert_close, fresh_seed

transformers = pytest.importorskip("transformers")
VOCAB, EOS, PAD = 99, 98, 97


def _tiny(cls, seed: int, eos: int = EOS, act: str = "quick_gelu"):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=24, hidden_act=act,
                                      projection_dim=16, eos_token_id=eos, bos_token_id=1, pad_token_id=PAD)
    return cls(cfg).eval()


def _inputs(seed: int, pad: int, batch: int = 3, length: int = 24, shortest: int = 2):
    """BOS, words, EOS, then padding; the tokenizer's layout. Row 0 fills the whole length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), pad)
    mask = torch.zeros(batch, length, dtype=torch.int64)
    for b in range(batch):
        n = length if b == 0 else int(torch.randint(shortest, length, (1,), generator=g))
        ids[b, 0] = 1
        ids[b, 1:n - 1] = torch.randint(2, EOS - 3, (n - 2,), generator=g)
        ids[b, n - 1] = EOS
        mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("with_mask", [True, False])
def test_text_model_matches(with_mask):
    seed = fresh_seed()
    model = _tiny(transformers.CLIPTextModel, seed)
    ids, mask = _inputs(seed, PAD)
    m = mask if with_mask else None
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=m, output_hidden_states=True)
    w, cfg = dict(model.state_dict()), model.config.to_dict()
    for index in (-2, 0, 1, 3):
        with torch.no_grad():
            ours = text_clip.encode(w, cfg, ids, m, hidden_state_index=index)
        assert_close(ours["hidden_states"], ref.hidden_states[index], f"hidden_states[{index}]", seed)
    assert_close(ours["last_hidden_state"], ref.last_hidden_state, "last_hidden_state", seed)
    assert_close(ours["pooled"], ref.pooler_output, "pooled", seed)
    assert "text_embeds" not in ours
    # pooled is read at the EOS position, not the last one (padding follows it)
    row = int(mask[1].sum()) - 1
    assert torch.equal(ours["pooled"][1], ours["last_hidden_state"][1, row])


def test_with_projection_and_gelu():
    """CLIP-G style: gelu, projection, pad id 0 ('!'), penultimate state (SD3's prompt embeddings)."""
    seed = fresh_seed()
    model = _tiny(transformers.CLIPTextModelWithProjection, seed, act="gelu")
    ids, mask = _inputs(seed, pad=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = text_clip.encode(dict(model.state_dict()), model.config.to_dict(), ids, mask, hidden_state_index=-2)
    assert_close(ours["hidden_states"], ref.hidden_states[-2], "penultimate", seed)
    assert_close(ours["last_hidden_state"], ref.last_hidden_state, "last_hidden_state", seed)
    assert_close(ours["text_embeds"], ref.text_embeds, "text_embeds", seed)


def test_legacy_eos_id_pools_at_highest_id():
    """Configs with eos_token_id 2 (older CLIP exports) pool at argmax(input_ids), as transformers does."""
    seed = fresh_seed()
    model = _tiny(transformers.CLIPTextModel, seed, eos=2)
    ids, mask = _inputs(seed, PAD, shortest=5)
    ids[:, 3] = VOCAB - 1  # the highest id, first seen before the EOS
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        ours = text_clip.encode(dict(model.state_dict()), model.config.to_dict(), ids, mask)
    assert_close(ours["pooled"], ref.pooler_output, "legacy pooled", seed)
    assert torch.equal(ours["pooled"], ours["last_hidden_state"][:, 3])


def test_too_long_input_is_refused():
    from ditbake.runtime.errors import InputError
    model = _tiny(transformers.CLIPTextModel, 0)
    with pytest.raises(InputError, match="positions"):
        text_clip.encode(dict(model.state_dict()), model.config.to_dict(), torch.ones(1, 30, dtype=torch.int64))


def test_fp16_follows_transformers_dtypes():
    seed = fresh_seed()
    model = _tiny(transformers.CLIPTextModelWithProjection, seed).to(torch.float16)
    ids, mask = _inputs(seed, PAD)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
        ours = text_clip.encode(dict(model.state_dict()), model.config.to_dict(), ids, hidden_state_index=-2)
    assert_close(ours["hidden_states"], ref.hidden_states[-2], "fp16 penultimate", seed, rel=1e-2)
    assert_close(ours["text_embeds"], ref.text_embeds, "fp16 text_embeds", seed, rel=1e-2)
