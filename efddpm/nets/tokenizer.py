"""CLIP byte-pair-encoding tokenizer as Stable Diffusion 1.x uses it: prompts -> token ids [B, 77].

The pipeline, run by HuggingFace `tokenizers`:

    text -> NFC -> every run of whitespace becomes one space -> lowercase
         -> words: contractions ('s 't 're 've 'm 'll 'd), runs of letters, single digits and runs of other
            non-space characters; spaces are dropped
         -> each word's UTF-8 bytes written in the 256-character byte-level alphabet
         -> BPE inside each word, whose last symbol carries the suffix "</w>"
    ids = [<|startoftext|>, up to 75 tokens, <|endoftext|>, <|endoftext|> padding]   (77 in all)

Accents are kept, and there is no HTML unescaping or ftfy-style text repair. "<|startoftext|>" and
"<|endoftext|>" written in a prompt, in any case, become their ids 49406 and 49407.

The vocabulary comes from a diffusers `tokenizer/` folder (tokenizer.json as transformers >= 5 saves it, or
vocab.json + merges.txt; only the vocabulary and merges are read, the pipeline is always the one above) or,
offline, from the merges file shipped in efddpm/nets/data (MIT, OpenAI CLIP via open_clip), from which the
49408-token vocabulary is derived as CLIP defines it: the 256 byte characters, the same followed by "</w>",
the results of the first 48894 merges, then <|startoftext|> and <|endoftext|>.

Parity. Ids equal transformers 4's `CLIPTokenizerFast` (loaded from an SD tokenizer folder) on all text,
and its successor, the `CLIPTokenizer` of transformers >= 5 (what diffusers SD pipelines load there), on
all text but one case:
  - transformers 5 finds "<|startoftext|>"/"<|endoftext|>" only in lower case (sometimes only one of them,
    depending on how it was loaded); we find them in any case, as transformers 4, CLIP and the
    `"normalized": true` of SD's tokenizer_config.json do.
  - transformers 4's pure-Python `CLIPTokenizer` (what SD pipelines loaded before v5) gives the same ids on
    ordinary prompts. Without ftfy installed it differs on: CJK ideographs (a word each, so each gets
    "</w>"), characters of Unicode category C, which it deletes (controls U+0000-U+001F and U+007F-U+009F
    other than tab/CR/LF, soft hyphen U+00AD, zero-width space/joiner U+200B/U+200D as in emoji sequences,
    U+FFFD), and a word-final capital sigma (lowercased to "ς", not "σ"). With ftfy installed it also
    unescapes HTML (&amp; -> &), straightens curly quotes and folds ligatures and full-width letters.
    We follow the tokenizers-backed ones here.
"""
import gzip
import json
from functools import cache
from itertools import islice
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BUNDLED_MERGES = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file: 49152 tokens minus bytes minus specials
# CLIP's word pattern, less its alternatives for the special tokens: those are found before words are split
WORD_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"


def bundled_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The SD1.x vocabulary (token -> id, 49408 entries) and merges, derived from the shipped CLIP file."""
    with gzip.open(BUNDLED_MERGES, "rt", encoding="utf-8") as f:
        next(f)  # "#version" header
        merges = [tuple(line.split()) for line in islice(f, N_MERGES)]
    # CLIP orders the byte characters printable bytes first, then the rest mapped above U+00FF: by code point
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_tokenizer_json(file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a BPE tokenizer.json (the rest of it is ours: see the module docstring)."""
    try:
        vocab = Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)  # also checks the file
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
    model = json.loads(file.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{file}: a {model.get('type')} model, CLIP's is BPE")
    # merges are "a b" strings (tokenizers < 0.20) or [a, b] pairs (later); byte-level tokens hold no space
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"{file}: merge {bad!r} is not a pair of tokens")
    return vocab, merges


class CLIPTokenizer:
    """Prompts -> LongTensor [B, 77] of CLIP token ids, padded with <|endoftext|>."""

    model_max_length = 77

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        for special in (BOS, EOS):
            if special not in vocab:
                raise ValueError(f"vocabulary has no {special} token")
        tok = Tokenizer(BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=EOS))  # unk: as transformers
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),  # keep matches
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # found after normalisation, so "<|EndOfText|>" counts too (SD's tokenizer_config.json: normalized)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in (BOS, EOS)])
        self._tok = tok
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_id = self.eos_id  # SD1.x pads with <|endoftext|>
        self.vocab_size = len(vocab)

    @classmethod
    @cache
    def bundled(cls) -> "CLIPTokenizer":
        """The SD1.x tokenizer from the data shipped with efddpm (built once, then shared)."""
        return cls(*bundled_vocab_and_merges())

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        """Read the vocabulary and merges of a diffusers checkpoint's `tokenizer/` folder: tokenizer.json when
        it is there (what transformers >= 5 saves), else vocab.json and merges.txt."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(*_read_tokenizer_json(path / "tokenizer.json"))
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} has no tokenizer.json, nor vocab.json and merges.txt "
                                        f"({name} not found)")
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for n, line in enumerate((path / "merges.txt").read_text(encoding="utf-8").splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            pair = tuple(line.split(" "))
            if len(pair) != 2:
                raise ValueError(f"{path / 'merges.txt'} line {n} is not a pair of tokens: {line!r}")
            merges.append(pair)
        return cls(vocab, merges)

    def count_tokens(self, prompt: str) -> int:
        """Number of content tokens (without start/end); more than 75 means the prompt will be cut."""
        return len(self._tok.encode(prompt, add_special_tokens=False).ids)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """One prompt or a list of B prompts -> ids [B, 77]; content beyond 75 tokens is dropped."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = self.model_max_length
        rows = []
        for enc in self._tok.encode_batch(prompts, add_special_tokens=False):
            row = [self.bos_id, *enc.ids[: n - 2], self.eos_id]
            rows.append(row + [self.pad_id] * (n - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), n)  # [B, 77]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Token ids (list or 1-D tensor) -> lowercased text, special tokens dropped."""
        text = self._tok.decode(torch.as_tensor(ids).tolist(), skip_special_tokens=True)
        return " ".join(text.replace("</w>", " ").split())
