"""The paper's default settings, in one place: the method's functions, `Editor` and the command line read them here.

Settings that count steps are fractions of the step count N, so they scale with it: T_skip = 36 of N = 100 is
round(0.36 N) (7 of 20), and the colour manipulation's t-range 1..40 of 100 is 1..round(0.40 N).

A model can recommend other values of its own (the embedded shapes model: target guidance 7.5): they travel in
its single file's metadata (efddpm.checkpoint.save_single_file(..., defaults=...)) and reach `Editor` as
`models.defaults`; MODEL_DEFAULT_KEYS lists the ones a file may set.
"""
STEPS = 100                      # N, the sampling steps of the inversion and the edit
SOURCE_GUIDANCE = 3.5            # w_src, classifier-free guidance of the inversion under the source prompt
TARGET_GUIDANCE = 15.0           # w_tgt, of the edit under the target prompt(s)
SKIP_FRACTION = 0.36             # T_skip / N: the edit starts at step N - T_skip (36 of 100)
ETA = 1.0                        # DDPM (eta 1); 0 would be DDIM, whose sigma_t = 0 leaves no noise to extract
COLOUR_STRENGTH = 0.2            # s of the colour manipulation
COLOUR_T_RANGE = (0.01, 0.40)    # [T1, T2] / N: the steps t in which the colour manipulation pushes z_t (1..40 of 100)
SHIFT_SKIP_FRACTION = 0.0        # image shifting regenerates from the shifted x_T (skip 0)
P2P_CROSS_FRACTION = 0.6         # Prompt-to-Prompt's xa: cross-attention injected in this fraction of the steps
P2P_SELF_FRACTION = 0.2          # and sa, self-attention (the authors' main_run.py --mode p2pinv defaults)
P2P_DDIM_CROSS_FRACTION = 0.8    # the authors' DDIM + P2P baseline (--mode p2pddim) uses 0.8 and 0.4
P2P_DDIM_SELF_FRACTION = 0.4

# What a model's single file may recommend instead of the paper's values (Editor reads models.defaults):
#   target_guidance          w_tgt of edits
#   shift_skip_fraction      image shifting regenerates from the shifted x_{T - skip}, skip = this fraction of N
#   colour_source_guidance   w_src of the inversion before a colour manipulation (the guidance holds the colour
#                            a source prompt names)
#   colour_strength          s of the colour manipulation
MODEL_DEFAULT_RANGES = {"target_guidance": 100.0, "shift_skip_fraction": 0.99, "colour_source_guidance": 100.0,
                        "colour_strength": 100.0}   # each from 0 to this (guidance and strength: efddpm.core.checks)
MODEL_DEFAULT_KEYS = tuple(MODEL_DEFAULT_RANGES)


def default_skip(num_steps: int) -> int:
    """T_skip = 36 of 100 steps, scaled to num_steps (7 of 20)."""
    return round(SKIP_FRACTION * num_steps)


def default_colour_range(num_steps: int) -> tuple[int, int]:
    """The colour manipulation's steps [T1, T2] (the paper's t: 1 = last step), 1..40 of 100 scaled to num_steps."""
    low, high = (max(1, round(f * num_steps)) for f in COLOUR_T_RANGE)
    return low, high
