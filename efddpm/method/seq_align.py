"""Prompt-to-Prompt's bookkeeping of tokens: which tokens a word is, and which source token each target token takes
its attention map from (Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", Sec. 3.2).

Words are the prompt split on single spaces, and a word's tokens are found by adding up the characters of the tokens
decoded one by one until the word's length is reached, as google/prompt-to-prompt does (so "cat," is one word of two
tokens, and a word is matched exactly, case and punctuation included). Token positions count the start token: the
first content token is position 1 of the text encoder's 77.

    word swap (same number of words)      replacement_mapper: M [77, 77], target token j takes sum_i M[i, j] M_src[i]
    adding a phrase (different numbers)   refinement_mapper: A(j), the source token aligned with target token j
                                          by a global (Needleman-Wunsch) alignment of the two token sequences
    re-weighting                          equalizer: a scale per target token

The tokenizer is duck-typed (efddpm.nets.tokenizer.CLIPTokenizer: tokenizer(text) -> ids [1, 77],
count_tokens(text), decode(ids)), so the method layer does not depend on the networks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from efddpm.core.checks import words_of

LENGTH = 77                          # tokens the text encoder reads: start, 75 of content, end
MATCH, MISMATCH, GAP = 1, -1, 0      # the alignment's scores (those of google/prompt-to-prompt)


@dataclass(frozen=True)
class Tokens:
    """A prompt as the text encoder reads it."""
    text: str
    ids: tuple[int, ...]      # start, content (at most 75), end; no padding
    pieces: tuple[str, ...]   # the text of each content token, decoded alone

    @property
    def words(self) -> list[str]:
        return words_of(self.text)                                            # split on single spaces


def tokenize(tokenizer, text: str) -> Tokens:
    """The prompt's tokens, through efddpm's tokenizer (or any with the same three methods)."""
    n = min(tokenizer.count_tokens(text), LENGTH - 2)
    ids = tuple(tokenizer(text)[0, : n + 2].tolist())                         # [start, content..., end]
    return Tokens(text, ids, tuple(tokenizer.decode([i]) for i in ids[1:-1]))


def word_token_positions(tokens: Tokens, position: int) -> list[int]:
    """The token positions (1 = the first content token) of the word at `position` of tokens.words: the tokens are
    given to the words in turn, a word taking tokens until their characters cover its own."""
    words, out = tokens.words, []
    word, covered = 0, 0
    for n, piece in enumerate(tokens.pieces, start=1):
        if word >= len(words):
            break
        covered += len(piece)
        if word == position:
            out.append(n)
        if covered >= len(words[word]):
            word, covered = word + 1, 0
    return out


def word_positions(tokens: Tokens, word: str) -> list[int]:
    """The token positions of every occurrence of `word` (an exact match of a space-separated word)."""
    return [n for p, w in enumerate(tokens.words) if w == word for n in word_token_positions(tokens, p)]


# ---------------------------------------------------------------------------------------------
# Word swap: the source's maps, with those of the swapped words shared out (P2P Sec. 3.2, "Word Swap")
# ---------------------------------------------------------------------------------------------

def replacement_mapper(source: Tokens, target: Tokens, length: int = LENGTH) -> Tensor:
    """M [length, length] with M[i, j] = the share of source token i's map that target token j takes (P2P's
    Edit(M_t, M*_t, t) = M_t for a word swap, with the maps of a swapped word averaged when its token counts differ).

    Prompts of equally many words; the words that differ are swapped. Tokens before and between swapped words are
    paired in order (i -> j). A swapped word of s source and t target tokens: paired one to one when s == t, else
    each target token takes 1/t of every one of its source tokens. After the last swapped word the reference pairs
    token j with token j (not with i; they differ by the token counts' difference), and so does this."""
    if len(source.words) != len(target.words):
        raise ValueError(f"a word swap needs prompts of equally many words, got {len(source.words)} and "
                         f"{len(target.words)}")
    swaps = []                                                      # (source tokens, target tokens) of each swap
    for p, (a, b) in enumerate(zip(source.words, target.words)):
        s, t = word_token_positions(source, p), word_token_positions(target, p)
        if a != b and s and t:                                      # (a word past the 75 tokens read is dropped)
            swaps.append((s, t))
    m = torch.zeros(length, length, dtype=torch.float64)
    i = j = k = 0                                                   # source position, target position, swap
    while i < length and j < length:
        if k < len(swaps) and swaps[k][0][0] == i:
            s, t = swaps[k]
            if len(s) == len(t):
                m[s, t] = 1.0                                       # token by token
            else:
                m[torch.tensor(s)[:, None], torch.tensor(t)[None, :]] = 1.0 / len(t)
            i, j, k = i + len(s), j + len(t), k + 1
        elif k < len(swaps):
            m[i, j] = 1.0
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1.0                                           # the reference's pairing after the last swap
            i, j = i + 1, j + 1
    return m


# ---------------------------------------------------------------------------------------------
# Adding a phrase: the alignment A(j) of the target's tokens to the source's (P2P Sec. 3.2, "Adding a New Phrase")
# ---------------------------------------------------------------------------------------------

def global_alignment(x: tuple[int, ...], y: tuple[int, ...]) -> list[int]:
    """For each token of y, the index of the token of x it is aligned with, or -1 where y inserts a token.

    Needleman-Wunsch with match +1, mismatch -1, gap 0: score[i][j] is the best score of aligning x[:i] with y[:j];
    ties prefer a gap in x (y's token inserted), then a gap in y (x's token dropped), then the diagonal."""
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]        # gap 0: the borders stay 0
    move = [["left"] * (len(y) + 1) for _ in range(len(x) + 1)]    # row 0: y inserts; column 0: x drops
    for i in range(1, len(x) + 1):
        move[i][0] = "up"
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1] + GAP, score[i - 1][j] + GAP
            diagonal = score[i - 1][j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            score[i][j] = best = max(left, up, diagonal)
            move[i][j] = "left" if best == left else "up" if best == up else "diagonal"
    source_of, i, j = [-1] * len(y), len(x), len(y)
    while i > 0 or j > 0:                                           # trace the best path back from the end
        step = move[i][j]
        if step == "diagonal":
            source_of[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif step == "left":
            j -= 1
        else:
            i -= 1
    return source_of


def refinement_mapper(source: Tokens, target: Tokens, length: int = LENGTH) -> tuple[Tensor, Tensor]:
    """(index [length] long, alpha [length]): target token j takes source token index[j]'s map where alpha[j] = 1,
    its own where alpha[j] = 0 (a token the source does not have; P2P: (Edit)_ij = M*_ij if A(j) = None, else
    (M_t)_{i, A(j)}). Over the start, content and end tokens, A is the global alignment of the two sequences; the
    padding beyond the target's end takes the source's map at the same position, as the reference does."""
    aligned = global_alignment(source.ids, target.ids)
    n = len(aligned)
    index = torch.cat([torch.tensor(aligned, dtype=torch.long), torch.arange(n, length)])
    alpha = torch.ones(length, dtype=torch.float64)
    alpha[:n] = (index[:n] != -1).double()
    return index, alpha


# ---------------------------------------------------------------------------------------------
# Re-weighting (P2P Sec. 3.2, "Attention Re-weighting")
# ---------------------------------------------------------------------------------------------

def equalizer(target: Tokens, scales: dict[str, float], length: int = LENGTH) -> Tensor:
    """A scale per target token [length]: c for the tokens of each word given, 1 elsewhere ((Edit)_ij = c M_ij for
    j = j*)."""
    out = torch.ones(length, dtype=torch.float64)
    for word, c in scales.items():
        out[word_positions(target, word)] = float(c)
    return out
