"""Prompt-to-Prompt on the edit-friendly noise space (efddpm.method.p2p, efddpm.method.seq_align).

Parity: the mappers, windows, controller and local blend against the reference P2P logic (google/prompt-to-prompt's
ptp_utils / seq_aligner, as the edit-friendly authors vendor it), written here again from the published algorithm in
other terms: a word's tokens from the token counts of its prefixes, the word-swap matrix in closed form, the
alignment traced back from the scores, the blend from a per-layer attention store.
End to end, on a small random UNet in float64: nothing injected = the plain edit bit for bit; the source row is the
input again; the target's maps are the source's within the windows and its own outside them.
"""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from efddpm.app.cli import main
from efddpm.app.editor import Editor
from efddpm.method.defaults import P2P_DDIM_CROSS_FRACTION, P2P_DDIM_SELF_FRACTION
from efddpm.method.inversion import ddim_inversion, edit_friendly_inversion, native_inversion, regenerate
from efddpm.method.p2p import P2P, LocalBlend, PromptToPrompt, p2p_edit
from efddpm.method.seq_align import (equalizer, global_alignment, refinement_mapper, replacement_mapper, tokenize,
                                     word_token_positions)
from efddpm.nets.attention_control import AttentionSite
from efddpm.nets.tokenizer import CLIPTokenizer
from efddpm.nets.unet import UNet

from inversion_util import one_thread  # noqa: F401  (autouse fixture)
from models_util import METHOD_UNET, randomize_

TOK = CLIPTokenizer.bundled()
PAIRS = [  # (source, target): word swaps of equal and of different token counts, several swaps, phrase additions
    ("a photo of a cat", "a photo of a dog"),
    ("a cat sitting on a mat", "a capybara sitting on a rug"),
    ("a tiramisu on a plate", "a cake on a plate"),
    ("a cat, a dog and a bird", "a quokka, a dog and a narwhal"),
    ("a red circle on a white background", "a red circle on a white background"),
    ("a cat sitting on a mat", "a fluffy cat sitting on a red mat"),
    ("a photo of a cat", "a watercolor painting of a cat in the snow"),
    ("a quokka on the beach", "a beach"),
]


def tokens(text):
    return tokenize(TOK, text)


# ------------------------------------------------------------------------------------------ the reference, again

def oracle_word_tokens(text: str, p: int) -> list[int]:
    """Word p's tokens: CLIP splits words before byte-pair encoding, so the tokens of the first p words are the
    first tokens of the prompt."""
    words = text.split(" ")
    start, end = (1 + TOK.count_tokens(" ".join(words[:n])) for n in (p, p + 1))
    return list(range(start, min(end, 76)))


def oracle_word_swap(source: str, target: str) -> torch.Tensor:
    """The reference's replacement mapper in closed form: unchanged tokens paired with offset d (the token counts
    swapped so far, target minus source); a swapped word's tokens paired or shared out; after the last swap, token j
    with token j, for j from where the last swap ended to min(77, 77 + d)."""
    m, d, next_source = torch.zeros(77, 77, dtype=torch.float64), 0, 0
    swaps = [(oracle_word_tokens(source, p), oracle_word_tokens(target, p))
             for p, (a, b) in enumerate(zip(source.split(" "), target.split(" "))) if a != b]
    for s, t in swaps:
        for a in range(next_source, s[0]):
            m[a, a + d] = 1
        for n, a in enumerate(s):
            if len(s) == len(t):
                m[a, t[n]] = 1
            else:
                m[a, t] = 1 / len(t)
        d, next_source = d + len(t) - len(s), s[-1] + 1
    for j in range(next_source + d if swaps else 0, min(77, 77 + d) if swaps else 77):
        m[j, j] = 1
    return m


def oracle_alignment(x, y) -> list[int]:
    """Needleman-Wunsch (match 1, mismatch -1, gap 0), the path read back from the score table: at each cell a gap
    in x where its score allows, else a gap in y, else the diagonal (the reference's order of preference)."""
    s = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int64)
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            s[i, j] = max(s[i, j - 1], s[i - 1, j], s[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1))
    out, i, j = [-1] * len(y), len(x), len(y)
    while i or j:
        if i == 0 or (j > 0 and s[i, j] == s[i, j - 1]):
            j -= 1
        elif j == 0 or s[i, j] == s[i - 1, j]:
            i -= 1
        else:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
    return out


def oracle_refine(source: str, target: str):
    x, y = (TOK(t)[0, : TOK.count_tokens(t) + 2].tolist() for t in (source, target))
    a = oracle_alignment(x, y)
    index = torch.tensor(a + list(range(len(a), 77)))
    alpha = torch.tensor([float(v != -1) for v in a] + [1.0] * (77 - len(a)), dtype=torch.float64)
    return index, alpha


def oracle_equalizer(target: str, scales: dict) -> torch.Tensor:
    eq = torch.ones(77, dtype=torch.float64)
    for word, c in scales.items():
        for p, w in enumerate(target.split(" ")):
            if w == word:
                eq[oracle_word_tokens(target, p)] = c
    return eq


def oracle_cross_edit(base, own, source: str, target: str, scales: dict, alpha_word: float):
    """The reference's AttentionControlEdit.forward for one target row: replace or refine (then re-weight), mixed
    with the row's own maps by the time-word alpha (1 in the window, 0 outside)."""
    if len(source.split(" ")) == len(target.split(" ")):
        new = torch.einsum("hpw,wn->hpn", base, oracle_word_swap(source, target))
    else:
        index, alpha = oracle_refine(source, target)
        new = base[:, :, index] * alpha + own * (1 - alpha)
    if scales:
        new = new * oracle_equalizer(target, scales)
    return new * alpha_word + (1 - alpha_word) * own


def oracle_windows(num_steps: int, skip: int, xa: float, sa: float, window: str) -> tuple[list[bool], list[bool]]:
    """Per regenerated step: cross-attention replaced? self-attention? The reference's tables: time-word alphas of
    N + 1 rows (1 for rows [0, int(xa (N + 1))) ), self-attention for steps in [0, int(sa N)); N is all steps
    ("all") or those run ("run"); its step counter starts at the first step run."""
    n = num_steps if window == "all" else num_steps - skip
    alpha = torch.zeros(n + 1)
    alpha[: int(xa * alpha.shape[0])] = 1
    run = num_steps - skip
    return [bool(alpha[s] == 1) for s in range(run)], [s < int(n * sa) for s in range(run)]


def oracle_blend(store: list[torch.Tensor], words: torch.Tensor, x: torch.Tensor, res: int) -> torch.Tensor:
    """The reference's LocalBlend on an attention store (per blend layer, the conditional maps [rows * heads, N, 77]
    summed over the steps), for two rows: mean over layers and heads of the word-weighted maps, 3x3 max-pool, resize,
    divide by the max, > 0.3, the two masks joined; x_t = x_src + mask (x_t - x_src)."""
    maps = torch.cat([m.reshape(2, -1, 1, res, res, 77) for m in store], dim=1)
    maps = (maps * words.reshape(2, 1, 1, 1, 1, 77)).sum(-1).mean(1)
    mask = F.interpolate(F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1)), size=x.shape[2:])
    mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    mask = mask.gt(0.3)
    mask = (mask[:1] + mask[1:]).double()
    return x[:1] + mask * (x - x[:1])


# ------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("source, target", PAIRS)
def test_word_tokens_and_mappers_match_the_reference(source, target):
    src, tgt = tokens(source), tokens(target)
    for t, text in ((src, source), (tgt, target)):
        assert [word_token_positions(t, p) for p in range(len(t.words))] == \
            [oracle_word_tokens(text, p) for p in range(len(t.words))]
    if len(src.words) == len(tgt.words):
        assert torch.equal(replacement_mapper(src, tgt), oracle_word_swap(source, target))
    index, alpha = refinement_mapper(src, tgt)
    expected_index, expected_alpha = oracle_refine(source, target)
    assert torch.equal(index, expected_index) and torch.equal(alpha, expected_alpha)


def test_word_swap_of_different_token_counts_shares_the_maps():
    m = replacement_mapper(tokens("a cat sitting on a mat"), tokens("a capybara sitting on a rug"))
    assert torch.equal(m[2, 2:5], torch.full((3,), 1 / 3, dtype=torch.float64))   # cat -> cap, y, bara
    assert m[3, 5] == 1 and m[6, 8] == 1                                            # sitting; mat -> rug
    assert m[9, 9] == 1 and m[7].sum() == 0    # after it the reference pairs j with j: the source's end (7) is lost


def test_alignment_matches_the_reference_on_random_sequences():
    assert global_alignment((0, 1, 2, 3), (0, 1, 9, 2, 3)) == [0, 1, -1, 2, 3]     # a word inserted
    rng = random.Random(0)
    for _ in range(300):
        x = tuple(rng.randrange(4) for _ in range(rng.randrange(0, 9)))
        y = tuple(rng.randrange(4) for _ in range(rng.randrange(0, 9)))
        assert global_alignment(x, y) == oracle_alignment(x, y), (x, y)


def test_equalizer_matches_the_reference():
    target = "a cat, a big cat and a quokka"
    assert torch.equal(equalizer(tokens(target), {"a": 0.5, "quokka": 3.0}),
                       oracle_equalizer(target, {"a": 0.5, "quokka": 3.0}))
    eq = equalizer(tokens(target), {"cat": 2.0})
    assert eq[6] == 2 and eq[2] == 1 and eq.sum() == 77 + 1    # "cat," is another word: words match exactly


@pytest.mark.parametrize("source, target", PAIRS)
@pytest.mark.parametrize("scales", [{}, {"a": 2.5}])
def test_controller_edits_like_the_reference(source, target, scales):
    """On identical probabilities: the conditional target rows as the reference edits them, in and out of the
    cross window; the unconditional rows and the source row untouched; self-attention: the source's maps."""
    control = PromptToPrompt(tokens(source), [tokens(target)], P2P(xa=0.5, sa=0.5, reweight=scales),
                             num_steps=10, skip=0)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 3, 16, 77, generator=g, dtype=torch.float64), -1)  # [uncond x2; cond x2]
    cross, self_ = AttentionSite("down", 1, True, 0), AttentionSite("down", 1, False, 0)
    for step, alpha_word in ((0, 1.0), (4, 1.0), (5, 0.0)):               # int(0.5 * 11) = 5 steps
        control.step = step
        out = control(cross, probs)
        assert torch.equal(out[:3], probs[:3])
        expected = oracle_cross_edit(probs[2], probs[3], source, target, scales, alpha_word)
        assert torch.allclose(out[3], expected, rtol=0, atol=1e-15), step
    control.step = 0
    self_probs = torch.softmax(torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), -1)
    assert control.wants(self_, 16, 16) and control.wants(self_, 256, 256) and not control.wants(self_, 1024, 1024)
    out = control(self_, self_probs)
    assert torch.equal(out[:3], self_probs[:3]) and torch.equal(out[3], self_probs[2])


@pytest.mark.parametrize("num_steps, skip, xa, sa, window", [
    (100, 36, 0.6, 0.2, "all"), (50, 12, 0.4, 0.6, "all"), (50, 12, 0.4, 0.6, "run"), (100, 0, 0.8, 0.4, "run"),
    (100, 36, 1.0, 1.0, "all"), (100, 36, 1.0, 1.0, "run"), (20, 7, 0.33, 0.01, "run"), (12, 4, 0.0, 0.0, "all"),
    (15, 0, 0.9, 0.5, "all"), (16, 5, 0.7, 0.5, "run")])   # the last two: int(xa (n + 1)) > int(xa n)
def test_windows_match_the_reference(num_steps, skip, xa, sa, window):
    control = PromptToPrompt(tokens("a cat"), [tokens("a dog")], P2P(xa=xa, sa=sa, window=window),
                             num_steps=num_steps, skip=skip)
    cross, self_ = AttentionSite("up", 1, True, 0), AttentionSite("up", 1, False, 0)
    edited = []
    for step in range(num_steps - skip):
        control.step = step
        edited.append((control.wants(cross, 64, 77), control.wants(self_, 64, 64)))
    assert edited == list(zip(*oracle_windows(num_steps, skip, xa, sa, window)))


def test_local_blend_matches_the_reference():
    """Three steps of two blend layers (4x4 maps, 2 heads): the same x_t as the reference's LocalBlend on its
    attention store, and a mask that is neither empty nor full."""
    source, target = tokens("a red circle on white"), tokens("a blue circle on white")
    blend = LocalBlend([source, target], ("red", "blue"), level=1)
    g = torch.Generator().manual_seed(3)
    store = [torch.zeros(4, 16, 77, dtype=torch.float64) for _ in range(2)]
    for _ in range(3):
        for layer in range(2):
            logits = torch.randn(2, 2, 16, 77, generator=g, dtype=torch.float64)
            logits[0, :, 0, 2] += 8                                           # "red" at the top left corner,
            logits[1, :, 15, 2] += 8                                          # "blue" at the bottom right
            probs = torch.softmax(logits, -1)                                 # [rows, heads, 4x4, 77]
            blend.observe(probs)
            store[layer] += probs.reshape(4, 16, 77)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    words = torch.zeros(2, 77, dtype=torch.float64)
    words[0, 2], words[1, 2] = 1, 1                                           # "red" and "blue": token 2
    expected = oracle_blend(store, words, x, 4)
    out = blend(x)
    assert torch.allclose(out, expected, rtol=0, atol=1e-14)
    changed = (out[1] != x[0]).any(0)                                         # [8, 8]: the joined mask
    assert changed[:4, :4].all() and changed[4:, 4:].all() and not changed[:4, 4:].any()
    assert torch.equal(out[0], x[0])


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def setup():
    """The small UNet in float64, an edit-friendly code of 16 steps, stand-in text states for two prompts."""
    unet = randomize_(UNet(METHOD_UNET), 0).double().eval()
    g = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.interpolate(torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64), size=(8, 8),
                                         mode="bilinear")
    uncond, src, tgt = (torch.randn(1, 77, 32, generator=g, dtype=torch.float64) for _ in range(3))

    @torch.no_grad()
    def f(x, t, c):
        return unet(x, t, c)
    code = edit_friendly_inversion(f, x0, src, uncond, 3.5, num_steps=16, generator=torch.Generator().manual_seed(1))
    return unet, f, code, x0, src, tgt, uncond


SOURCE, TARGET = "a red circle on white", "a blue circle on white"


def run_p2p(setup, p2p, skip=5, spy=False, code=None):
    unet, f, code_, x0, src, tgt, uncond = setup
    code = code or code_
    control = PromptToPrompt(tokens(SOURCE), [tokens(TARGET)], p2p, num_steps=code.num_steps, skip=skip,
                             blend_level=1)
    watcher = Spy(control) if spy else control
    with unet.controlled(watcher):
        out = p2p_edit(f, code, src, tgt, uncond, 3.5, 7.5, control=control, skip=skip)
    return out, control, watcher


class Spy:
    """Sees every layer (explicit probabilities everywhere), lets the P2P controller act where it wants to, and
    logs (step, site, what came in, what went out)."""

    def __init__(self, inner):
        self.inner, self.log, self.inner_wants = inner, [], False

    def wants(self, site, queries, keys):
        self.inner_wants = self.inner.wants(site, queries, keys)
        return True

    def __call__(self, site, probs):
        out = self.inner(site, probs) if self.inner_wants else probs
        self.log.append((self.inner.step, site, probs, out))
        return out


def test_nothing_to_inject_is_the_plain_edit_bit_for_bit(setup, monkeypatch):
    unet, f, code, x0, src, tgt, uncond = setup
    import efddpm.nets.unet as unet_module
    monkeypatch.setattr(unet_module, "attention_probabilities", lambda *a: pytest.fail("probabilities formed"))
    out, control, _ = run_p2p(setup, P2P(xa=0.0, sa=0.0))
    plain = regenerate(f, code, torch.cat([src, tgt]), uncond, [3.5, 7.5], skip=5)
    assert torch.equal(out, plain) and control.consulted > 0 and control.step == 16 - 5


def test_the_source_row_reproduces_the_input(setup):
    for p2p in (P2P(xa=0.6, sa=0.4, blend=("red", "blue"), reweight={"circle": 2.0}), P2P(xa=1.0, sa=1.0,
                                                                                          window="run")):
        out, control, _ = run_p2p(setup, p2p)
        assert (out[0] - setup[3]).abs().max() <= 1e-10
        assert (out[1] - out[0]).abs().max() > 1e-3


def test_target_maps_are_the_sources_within_the_windows_only(setup):
    """The maps the layers used, logged: in the window the target's are the source's (cross: through the word-swap
    matrix), outside its own; the unconditional rows and the source row never change; the local blend sums the
    maps as they were used, over the words' tokens ("red" and "blue": token 2)."""
    out, control, spy = run_p2p(setup, P2P(xa=0.5, sa=0.3, blend=("red", "blue")), spy=True)
    assert (control.cross_steps, control.self_steps) == (8, 4)                # int(0.5 * 17), int(0.3 * 16)
    m = oracle_word_swap(SOURCE, TARGET)
    blend_maps = sum(after[2:, :, :, 2].sum(1) for _, site, _, after in spy.log
                     if site.cross and site.place != "mid")                   # [2, 16]: level 1, down and up
    assert torch.allclose(control.blend.maps, blend_maps, rtol=1e-13, atol=0)
    seen = set()
    for step, site, before, after in spy.log:
        assert torch.equal(after[:2], before[:2]) and torch.equal(after[2], before[2])  # uncond rows, source row
        source, target = after[2], after[3]
        injected = torch.einsum("hpw,wn->hpn", source, m) if site.cross else source
        inside = step < (control.cross_steps if site.cross else control.self_steps)
        if inside:
            assert torch.allclose(target, injected, rtol=0, atol=1e-15)
        else:
            assert torch.equal(target, before[3]) and (target - injected).abs().max() > 1e-3
        seen.add((site.cross, inside))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}
    assert len(spy.log) == 8 * (16 - 5)


def test_a_controller_not_set_on_the_unet_is_refused(setup):
    unet, f, code, x0, src, tgt, uncond = setup
    control = PromptToPrompt(tokens(SOURCE), [tokens(TARGET)], P2P(), num_steps=16, skip=5)
    with pytest.raises(RuntimeError, match="never consulted"):
        p2p_edit(f, code, src, tgt, uncond, 3.5, 7.5, control=control, skip=5)


def test_p2p_on_ddim_and_native_codes(setup):
    """DDIM + P2P (the authors' p2pddim baseline, their xa 0.8 and sa 0.4, from x_T): the source row is the plain
    DDIM regeneration; a native DDPM code's source row is the input."""
    unet, f, code, x0, src, tgt, uncond = setup
    ddim = ddim_inversion(f, x0, src, uncond, 3.5, num_steps=16)
    out, control, _ = run_p2p(setup, P2P(xa=P2P_DDIM_CROSS_FRACTION, sa=P2P_DDIM_SELF_FRACTION), skip=0,
                              code=ddim)
    assert (control.cross_steps, control.self_steps) == (13, 6)
    assert (out[0] - regenerate(f, ddim, src, uncond, 3.5)).abs().max() <= 1e-10
    assert (out[1] - regenerate(f, ddim, tgt, uncond, 7.5)).abs().max() > 1e-3
    native = native_inversion(f, x0, src, uncond, 3.5, num_steps=16, generator=torch.Generator().manual_seed(2))
    out, _, _ = run_p2p(setup, P2P(xa=0.6, sa=0.2), code=native)
    assert (out[0] - x0).abs().max() <= 1e-10


# ------------------------------------------------------------------------------------------ Editor and command line

def test_editor_p2p(model, picture):
    editor = Editor.from_pretrained(str(model))
    code = editor.invert(picture, "a red square", steps=12, seed=0)
    plain = editor.edit(code, "a blue square", skip=4, output="tensor")
    assert torch.equal(editor.edit(code, "a blue square", skip=4, output="tensor", p2p=P2P(xa=0.0, sa=0.0)), plain)
    edited = editor.edit(code, ["a blue square", "a big red square"], skip=4, output="tensor",
                         p2p=P2P(xa=0.6, sa=0.4, blend=("red", "blue")))
    assert edited.shape == (2, 3, 32, 32) and (edited[0] - plain[0]).abs().max() > 1e-3


def metadata(path):
    with Image.open(path) as img:
        return json.loads(img.text["efddpm"])


def test_cli_edit_batch_and_regenerate_record_p2p(tmp_path, model, picture):
    fast = ["--model", str(model), "--steps", "12", "--skip", "4", "--seed", "0", "--quiet"]
    assert main(["edit", str(picture), "--source", "a red square", "--target", "a blue square", "--p2p", "--xa", "0.5",
                 "--blend", "red", "blue", "--reweight", "square=2", "--out", str(tmp_path / "e"), *fast]) == 0
    assert metadata(tmp_path / "e" / "red_1.png")["p2p"] == {
        "xa": 0.5, "sa": 0.2, "window": "all", "cross_steps": 6, "self_steps": 2, "blend": ["red", "blue"],
        "reweight": {"square": 2.0}, "mode": "replace"}
    second = tmp_path / "blue.png"
    Image.open(picture).save(second)
    listing = tmp_path / "edits.json"
    listing.write_text(json.dumps([
        {"image": str(picture), "source": "a red square", "targets": ["a big red square"], "p2p": True, "sa": 0.5,
         "p2p_window": "run"},
        {"image": str(second), "source": "a red square", "targets": ["a blue square"]}]))
    assert main(["batch", str(listing), "--out", str(tmp_path / "b"), *fast]) == 0
    p2p = metadata(tmp_path / "b" / "red_1.png")["p2p"]
    assert (p2p["sa"], p2p["window"], p2p["self_steps"], p2p["mode"]) == (0.5, "run", 4, "refine")
    assert "p2p" not in metadata(tmp_path / "b" / "blue_1.png")
    code = tmp_path / "red.safetensors"
    assert main(["invert", str(picture), "--source", "a red square", "-o", str(code), *fast[:4], "--quiet"]) == 0
    assert main(["regenerate", str(code), "--target", "a blue square", "--skip", "4", "--p2p", "--sa", "0.5",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert metadata(tmp_path / "r" / "red_1.png")["p2p"]["self_steps"] == 6
