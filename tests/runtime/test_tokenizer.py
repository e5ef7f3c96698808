"""runtime/tokenizer.py against transformers' CLIP and T5 fast tokenizers (trained offline with `tokenizers`; in
transformers 5 CLIPTokenizerFast/T5TokenizerFast are the tokenizers-backed CLIPTokenizer/T5Tokenizer)."""
import json

import pytest
import torch

from ditbake.runtime.errors import ArtifactError, InputError
from ditbake.runtime.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from ditbake.exporter.components import export_tokenizer  # noqa: E402

CORPUS = [f"a {c} {a} {v} slowly over the {p} at dawn, {n} times" for c in ("red", "small", "blue", "old", "shiny")
          for a in ("cat", "dog", "robot", "horse") for v in ("walks", "jumps", "flies") for p in ("river", "city")
          for n in ("two", "seven")] + ["Café naïve déjà vu — 東京 夜景 🙂 ünïcödé"]
PROMPTS = [
    "", "a cat walks", "A RED Robot Jumps over the river", "  multiple   spaces\tand\nnewlines  ",
    "Café naïve — 東京 🙂 zebra-crossing!!", "unseen words: xylophone quokka",
    " ".join(CORPUS[:6]),  # long: truncated
    "<|endoftext|> written out, and </s> too",
]


def _clip_like():
    """A BPE tokenizer with CLIP's pipeline, wrapped in transformers' own CLIP tokenizer class."""
    from tokenizers import Regex, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    tok = tokenizers.Tokenizer(BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    return transformers.CLIPTokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def _t5_like():
    """A Unigram (SentencePiece-like) tokenizer with T5's pipeline, wrapped in transformers' T5 tokenizer."""
    from tokenizers import pre_tokenizers, trainers
    from tokenizers.models import Unigram
    tok = tokenizers.Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=3)


def _compare(hf, ours: Tokenizer, length: int, what: str):
    ref = hf(PROMPTS, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
             return_tensors="pt")
    got = ours(PROMPTS)
    for key in ("input_ids", "attention_mask"):
        assert got[key].dtype == torch.int64 and got[key].shape == (len(PROMPTS), length)
        rows = [i for i in range(len(PROMPTS)) if not torch.equal(got[key][i], ref[key][i])]
        assert not rows, f"{what} {key} differ for {[PROMPTS[i] for i in rows]}: " \
                         f"{got[key][rows[0]].tolist()} vs {ref[key][rows[0]].tolist()}"
    one = ours(PROMPTS[1])
    assert torch.equal(one["input_ids"][0], ref["input_ids"][1])
    assert ref["attention_mask"][:, -1].any() and not ref["attention_mask"].all()  # truncated and padded rows


@pytest.mark.parametrize("make", [_clip_like, _t5_like])
@pytest.mark.parametrize("sides", [("right", "right"), ("left", "left")])
def test_matches_transformers(tmp_path, make, sides):
    hf = make()
    hf.padding_side, hf.truncation_side = sides
    length = 12
    files = export_tokenizer(hf, tmp_path, length)
    assert sorted(files) == sorted(p.name for p in tmp_path.iterdir())
    _compare(hf, Tokenizer.load(tmp_path), length, f"{make.__name__} {sides}")


def test_clip_g_style_pad_token(tmp_path):
    """SD3's second CLIP pads with '!' (id of a real token), not with the end-of-text token."""
    hf = _clip_like()
    hf.pad_token = "!"
    export_tokenizer(hf, tmp_path, 10)
    ours = Tokenizer.load(tmp_path)
    assert ours.settings["pad_token_id"] == hf.convert_tokens_to_ids("!") != hf.eos_token_id
    _compare(hf, ours, 10, "clip pad '!'")
    with pytest.raises(InputError, match="too short"):  # one position cannot hold both BOS and EOS
        ours(["a cat"], max_length=1)


def test_max_length_override_and_hostile_inputs(tmp_path):
    hf = _t5_like()
    export_tokenizer(hf, tmp_path, 8)
    ours = Tokenizer.load(tmp_path)
    ref = hf(PROMPTS, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    assert torch.equal(ours(PROMPTS, max_length=20)["input_ids"], ref["input_ids"])
    assert ours(PROMPTS)["input_ids"].shape == (len(PROMPTS), 8)
    for bad in ([], [None], 3):
        with pytest.raises(InputError):
            ours(bad)
    one = hf(["a cat"], padding="max_length", max_length=1, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours(["a cat"], max_length=1)["input_ids"], one) and one.tolist() == [[hf.eos_token_id]]
    (tmp_path / "tokenizer_settings.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer_settings.json"):
        Tokenizer.load(tmp_path)
