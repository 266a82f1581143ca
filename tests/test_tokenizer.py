"""CLIP tokenizer: the vocabulary derived from the shipped merges, the 77-id framing, and ids equal to transformers'."""
import json
import random

import pytest
import torch

from efddpm.nets.tokenizer import BOS, EOS, CLIPTokenizer, bundled_vocab_and_merges

from models_util import write_tokenizer_folder

HARD_PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT, MixedCase iPhone McDonald's",
    "Hello, World!!! ... ?! (parentheses) [brackets] {braces} --- ***",
    "digits 0123456789, 3.14159, 10,000 and 1st 2nd 3rd",
    "café naïve résumé, niño ñandú, über Müller, Åland Ångström",
    "decomposed e\u0301 and n\u0303 and A\u030a",
    "emoji 😀 🐱 ❤️ 👍🏽 🎉🎉🎉",
    "中文 你好世界, 日本語のテキスト, 한국어",
    "  lots   of\tspaces\t\tand\nnew\n\nlines \r\n ",
    "it's they're don't we've I'm you'll he'd IT'S THEY'RE",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;",
    "https://example.com/path/to-page?q=1&x=y#frag and www.site.org",
    "masterpiece, best quality, (ultra detailed:1.2), 8k, trending on artstation " * 4,  # over 77 tokens
]


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """Random strings mixing the character classes the tokenizer treats differently."""
    pools = ["abcXYZ", " \t\n", "0123456789", ".,!?'\"&;:/-_()<>|", "éñüÅßΣ\u0301", "你好中文", "😀👍🏽❤️",
             "'s 't 're 've 'm 'll 'd"]
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def clip_byte_chars() -> list[str]:
    """CLIP's byte -> character table, in vocabulary order, written out independently of the module."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers-style tokenizer/ folder written from the shipped merges file."""
    return write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def reference(folder):
    transformers = pytest.importorskip("transformers")
    # CLIPTokenizerFast is what transformers >= 5 also calls CLIPTokenizer; in 4.x CLIPTokenizer is the
    # pure-Python one, which differs on CJK and control characters (see efddpm/nets/tokenizer.py)
    return transformers.CLIPTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def json_folder(tmp_path_factory, reference):
    """The tokenizer/ folder as transformers saves it, reduced to tokenizer.json (all that transformers >= 5
    writes besides tokenizer_config.json; its merges are [a, b] pairs)."""
    path = tmp_path_factory.mktemp("tokenizer-json")
    reference.save_pretrained(path)
    for name in ("vocab.json", "merges.txt"):  # written by transformers 4 only
        (path / name).unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def string_merges_folder(tmp_path_factory, json_folder):
    """The same tokenizer.json with its merges as "a b" strings, as tokenizers < 0.20 wrote them."""
    data = json.loads((json_folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    path = tmp_path_factory.mktemp("tokenizer-json-strings")
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bundled", "from_folder", "tokenizer_json", "tokenizer_json_string_merges"])
def tok(request):
    if request.param == "bundled":
        return CLIPTokenizer.bundled()
    folder = {"from_folder": "folder", "tokenizer_json": "json_folder",
              "tokenizer_json_string_merges": "string_merges_folder"}[request.param]
    return CLIPTokenizer.from_folder(request.getfixturevalue(folder))


def reference_ids(reference, prompts):
    out = reference(prompts, padding="max_length", max_length=77, truncation=True)
    return torch.tensor(out["input_ids"])


def test_bundled_vocab_is_the_sd_vocab():
    vocab, merges = bundled_vocab_and_merges()
    assert len(vocab) == 49408 and len(set(vocab.values())) == 49408
    assert len(merges) == 48894 and merges[0] == ("i", "n") and merges[-1] == ("jeky", "ll</w>")
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    known = {"!": 0, "a</w>": 320, "photo</w>": 1125, "cat</w>": 2368, "dog</w>": 1929, "of</w>": 539}
    assert {t: vocab[t] for t in known} == known


def test_byte_characters_in_clip_order():
    vocab, _ = bundled_vocab_and_merges()
    chars = clip_byte_chars()
    assert [vocab[c] for c in chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in chars] == list(range(256, 512))


def test_matches_transformers_on_hard_prompts(tok, reference):
    ids = tok(HARD_PROMPTS)  # [B, 77]
    assert ids.dtype == torch.long and ids.shape == (len(HARD_PROMPTS), 77)
    torch.testing.assert_close(ids, reference_ids(reference, HARD_PROMPTS), rtol=0, atol=0)


def test_matches_transformers_on_random_text(tok, reference):
    prompts = random_prompts(300)
    torch.testing.assert_close(tok(prompts), reference_ids(reference, prompts), rtol=0, atol=0)


def test_count_tokens_matches_transformers(tok, reference):
    for prompt in HARD_PROMPTS:
        assert tok.count_tokens(prompt) == len(reference(prompt)["input_ids"]) - 2, prompt
    assert tok.count_tokens("a photo of a cat") == 5
    assert tok.count_tokens("") == 0


def test_single_prompt_and_framing(tok):
    ids = tok("a photo of a cat")  # [1, 77]
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == tok.pad_id).all() and tok.pad_id == tok.eos_id == 49407 and tok.bos_id == 49406
    assert tok([]).shape == (0, 77)


def test_truncation_keeps_the_end_token(tok):
    words = [f"w{i}" for i in range(200)]  # "w" and a digit or more each: well over 75 tokens
    prompt = " ".join(words)
    assert tok.count_tokens(prompt) > 75
    ids = tok(prompt)[0]  # [77]
    assert ids[0] == 49406 and ids[76] == 49407 and (ids[1:76] != 49407).all()
    start = " ".join(words[:25])  # 65 tokens, not cut
    k = tok.count_tokens(start)
    assert k < 75 and ids[1 : 1 + k].tolist() == tok(start)[0, 1 : 1 + k].tolist()


def test_exactly_75_tokens_fit(tok):
    prompt = "cat " * 75
    assert tok.count_tokens(prompt) == 75
    ids = tok(prompt)[0]  # [77]
    assert (ids[1:76] == 2368).all() and ids[76] == 49407


@pytest.mark.parametrize("a, b", [
    ("A PHOTO of a Cat", "a photo of a cat"),
    ("  a \t photo\n\nof   a cat ", "a photo of a cat"),
    ("cafe\u0301", "café"),  # NFC
])
def test_normalisation_equivalences(tok, a, b):
    assert tok(a).tolist() == tok(b).tolist()


def test_accents_are_kept(tok):
    assert tok("café").tolist() != tok("cafe").tolist()


def test_special_tokens_in_text(tok):
    assert tok("a <|endoftext|> b")[0, :5].tolist() == [49406, 320, 49407, 321, 49407]
    # any case, as transformers 4, CLIP and SD's tokenizer_config.json ("normalized": true) have it
    assert tok("<|StartOfText|> <|ENDOFTEXT|>")[0, :4].tolist() == [49406, 49406, 49407, 49407]


def test_decode(tok):
    assert tok.decode(tok("A photo of a CAT!")[0]) == "a photo of a cat !"
    assert tok.decode(tok("café 😀 中文")[0]) == "café 😀 中文"


def test_bundled_is_built_once():
    assert CLIPTokenizer.bundled() is CLIPTokenizer.bundled()


def test_from_folder_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_bytes((folder / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthree tokens here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")  # read first when present
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        CLIPTokenizer.from_folder(tmp_path)
