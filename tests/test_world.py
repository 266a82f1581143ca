"""The picture generator of the default model and the pixel rules of the edit benchmark (efddpm.miniature.world)."""
import numpy as np

from efddpm.miniature import world


def test_seeded_and_split():
    assert world.pictures(50, seed=3) == world.pictures(50, seed=3)
    assert world.pictures(50, seed=3) != world.pictures(50, seed=4)
    train, held = world.pictures(400, seed=1), world.heldout_pictures(400, seed=1)
    assert all(p.split == "train" for p in train) and all(p.split == "heldout" for p in held)
    assert not set(train) & set(held)
    # about 1 in HELDOUT_MODULUS of all pictures is held out
    rng = np.random.default_rng(0)
    fraction = np.mean([world.Picture(*_raw(rng)).split == "heldout" for _ in range(5000)])
    assert abs(fraction - 1 / world.HELDOUT_MODULUS) < 0.02


def _raw(rng):
    return (str(rng.choice(world.SHAPES)), "red", "white", int(rng.integers(18, 41)), int(rng.integers(12, 53)),
            int(rng.integers(12, 53)))


def test_pictures_and_captions():
    for p in world.pictures(200, seed=2):
        assert p.colour != p.background
        half = p.size / 2
        assert world.MARGIN <= p.cx - half and p.cx + half <= world.DEFAULT_SIZE - world.MARGIN
        assert world.MARGIN <= p.cy - half and p.cy + half <= world.DEFAULT_SIZE - world.MARGIN
    assert world.caption("red", "circle", "white") == "a red circle on a white background"
    assert world.caption("orange", "star", "gray") == "an orange star on a gray background"
    img = world.render(world.Picture("square", "blue", "white", 20, 32, 32))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[32, 32]) == world.COLOURS["blue"] and tuple(img[2, 2]) == world.BACKGROUNDS["white"]


def test_pixel_rules_read_clean_pictures_exactly():
    """On drawn pictures the rules are never wrong: colour, shape class, box within 1 px of the spec."""
    for p in world.heldout_pictures(300, seed=5):
        img = world.render(p)
        mask = world.shape_mask(img, p.background)
        assert world.shape_colour(img, mask) == p.colour
        assert world.shape_class(mask)[0] == p.shape
        x0, y0, x1, y1 = world.box(mask)
        half = p.size / 2
        assert max(abs(x0 - (p.cx - half)), abs(x1 - (p.cx + half)), abs(y0 - (p.cy - half)),
                   abs(y1 - (p.cy + half))) <= 1.0
        assert world.background_kept(img, mask, p.background) == 1.0


def test_measurements():
    p = world.Picture("circle", "red", "white", 30, 32, 32)
    img = world.render(p)
    mask = world.shape_mask(img, "white")
    assert world.iou(mask, mask) == 1.0 and world.box_iou(world.box(mask), world.box(mask)) == 1.0
    moved = world.shape_mask(world.render(world.Picture("circle", "red", "white", 30, 40, 32)), "white")
    assert 0.4 < world.iou(mask, moved) < 0.8
    assert abs(world.centroid(moved)[0] - world.centroid(mask)[0] - 8) < 0.5
    speckled = mask.copy()
    speckled[2, 2] = speckled[60, 61] = True           # isolated specks do not change class or box
    assert world.shape_class(speckled)[0] == "circle" and world.box(speckled) == world.box(mask)
    assert world.shape_colour(img, np.zeros_like(mask)) is None and world.shape_class(~np.ones_like(mask)) == (None, 0.0)
    colour_edit, shape_edit = world.edit_targets(p)
    assert colour_edit.colour not in ("red", "white") and colour_edit.shape == "circle"
    assert shape_edit.shape != "circle" and shape_edit.colour == "red"
    assert (colour_edit.size, colour_edit.cx, colour_edit.cy) == (shape_edit.size, shape_edit.cx, shape_edit.cy) == (30, 32, 32)


def _nearest_with_caption(p: world.Picture, target: world.Picture, reach: int = 10) -> world.Picture:
    """Brute force: of the pictures with target's caption (every size, centres within `reach` px of p's),
    the one nearest to p in pixels (L2)."""
    src = world.render(p).astype(np.float64)
    best = None
    for side in range(world.SIZES[0], world.SIZES[1] + 1):
        lo = world.MARGIN + -(-side // 2)
        hi = world.DEFAULT_SIZE - lo
        for cx in range(max(lo, p.cx - reach), min(hi, p.cx + reach) + 1):
            for cy in range(max(lo, p.cy - reach), min(hi, p.cy + reach) + 1):
                q = world.Picture(target.shape, target.colour, target.background, side, cx, cy)
                d = ((world.render(q) - src) ** 2).sum()
                if best is None or d < best[0]:
                    best = (d, q)
    return best[1]


def test_recolour_within_contrast_says_where_the_nearest_target_picture_is():
    """The rule against a brute-force search: within contrast, the nearest picture with the target caption is
    the shape in place (size within 2 px: anti-aliasing); beyond it, a smaller shape (the smallest, or at least
    3 px smaller) or one elsewhere. 10 held-out colour edits, 4 within contrast (measured)."""
    pics = world.heldout_pictures(10)
    within = 0
    for p in pics:
        target = world.edit_targets(p)[0]
        q = _nearest_with_caption(p, target)
        if world.recolour_within_contrast(p, target):
            within += 1
            assert (q.cx, q.cy) == (p.cx, p.cy) and abs(q.size - p.size) <= 2, (p, q)
        else:
            moved = max(abs(q.cx - p.cx), abs(q.cy - p.cy)) > 2
            assert q.size == world.SIZES[0] or q.size <= p.size - 3 or moved, (p, q)
    assert 2 <= within <= 8      # both kinds are checked
