"""export.calibration: the shipped calibration folder, the user-folder formats, hashing, verify and build."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import calibration as cal

SHIPPED = Path(__file__).parent.parent / "calibration_data"
PROMPT = "USER: <image> how many digits are there ? ASSISTANT:"


def _image(path: Path, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (20, 24) if mode == "L" else (20, 24, 3), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def _jsonl_folder(tmp_path: Path, rows: list[dict], name: str = "cal") -> Path:
    d = tmp_path / name
    (d / "images").mkdir(parents=True)
    for i, r in enumerate(rows):
        if r["image"].startswith("images/") and not (d / r["image"]).exists():
            _image(d / r["image"], seed=i)
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_shipped_folder_loads_and_verifies():
    pairs = cal.load_pairs(SHIPPED)
    assert len(pairs) >= 64
    for image, prompt in pairs:
        assert image.mode == "RGB" and prompt.count("<image>") == 1
    sources = {s.source for s in cal.pair_specs(SHIPPED)}
    assert {"digitsvqa-train", "digitsvqa-train+sklearn-china.jpg", "digitsvqa-train+sklearn-flower.jpg"} <= sources
    manifest = cal.verify(SHIPPED)
    assert manifest["counts"]["pairs"] == len(pairs)
    assert manifest["dataset_sha256"] == cal.dataset_sha256(SHIPPED)
    assert (SHIPPED / "README.md").is_file()


def test_verify_fails_after_one_byte_changes(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED, copy)
    assert cal.dataset_sha256(copy) == cal.dataset_sha256(SHIPPED)   # location does not enter the hash
    cal.verify(copy)
    target = copy / "images" / "train-0003.png"
    data = bytearray(target.read_bytes())
    data[-20] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-0003.png: sha256 .* does not match manifest.json"):
        cal.verify(copy)
    assert cal._main(["verify", str(copy)]) == 1


def test_dataset_sha256_follows_prompts_not_location_or_form(tmp_path):
    rows = [{"image": "images/a.png", "prompt": PROMPT, "source": "x"},
            {"image": "images/b.png", "prompt": PROMPT.replace("how many", "what"), "source": "y"}]
    d = _jsonl_folder(tmp_path, rows)
    h = cal.dataset_sha256(d)
    shutil.copytree(d, tmp_path / "elsewhere")
    assert cal.dataset_sha256(tmp_path / "elsewhere") == h
    rows[1]["prompt"] = rows[1]["prompt"].replace("what", "which")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cal.dataset_sha256(d) != h
    # order and sources do not enter
    flat = tmp_path / "reordered"
    shutil.copytree(d, flat)
    (flat / "pairs.jsonl").write_text("".join(json.dumps({"image": r["image"], "prompt": r["prompt"]}) + "\n"
                                              for r in reversed(rows)))
    assert cal.dataset_sha256(flat) == cal.dataset_sha256(d)
    # nor the form: the same pair as image + same-stem .txt and as pairs.jsonl
    txt, jsonl = tmp_path / "txt", tmp_path / "jsonl"
    for f in (txt, jsonl):
        f.mkdir()
        _image(f / "a.png")
    (txt / "a.txt").write_text(PROMPT)
    (jsonl / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "prompt": PROMPT}) + "\n")
    assert cal.dataset_sha256(txt) == cal.dataset_sha256(jsonl)


def test_user_folder_with_same_stem_txt_and_prompts_txt(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    _image(d / "b.JPG", 1)
    _image(d / "a.png", 2, mode="L")                     # greyscale comes back RGB
    _image(d / "c.webp", 3)
    (d / "a.txt").write_text("  USER: <image> what is this ? ASSISTANT:\n")
    (d / ".hidden.png").write_bytes(b"not an image")     # dotfiles are skipped
    (d / "notes.md").write_text("ignored")
    (d / "prompts.txt").write_text(PROMPT + "\n")
    pairs = cal.load_pairs(d)
    assert [p for _, p in pairs] == ["USER: <image> what is this ? ASSISTANT:", PROMPT, PROMPT]
    assert all(im.mode == "RGB" and im.size == (24, 20) for im, _ in pairs)
    assert [s.source for s in cal.pair_specs(d)] == ["image+txt", "prompts.txt", "prompts.txt"]

    only_txt = tmp_path / "only_txt"
    only_txt.mkdir()
    _image(only_txt / "x.bmp")
    (only_txt / "x.txt").write_text(PROMPT)
    assert [p for _, p in cal.load_pairs(only_txt)] == [PROMPT]


@pytest.mark.parametrize("setup, match", [
    ("missing", "does not exist"),
    ("empty", "no calibration pairs in"),
    ("unreadable", r"cannot read image .*broken\.png"),
    ("empty_prompt", "empty prompt for a.png"),
    ("no_placeholder", "contains '<image>' 0 times, needs exactly 1"),
    ("two_placeholders", "contains '<image>' 2 times, needs exactly 1"),
    ("escape", "leaves the folder"),
    ("absolute", "leaves the folder"),
    ("no_prompt", "has no prompt: add a.txt or a prompts.txt"),
    ("stray_txt", "stray.txt has no image with the same stem"),
    ("bad_json", "line 1 is not valid JSON"),
    ("missing_image", "not found"),
])
def test_errors_are_one_line_and_actionable(tmp_path, setup, match):
    d = tmp_path / "cal"
    if setup != "missing":
        d.mkdir()
    if setup in ("unreadable", "empty_prompt", "no_placeholder", "two_placeholders", "no_prompt", "stray_txt"):
        _image(d / "a.png")
    if setup == "unreadable":
        (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        (d / "prompts.txt").write_text(PROMPT)
    prompts = {"empty_prompt": " \n", "no_placeholder": "USER: what ? ASSISTANT:",
               "two_placeholders": "USER: <image> <image> ? ASSISTANT:"}
    if setup in prompts:
        (d / "a.txt").write_text(prompts[setup])
    if setup == "stray_txt":
        (d / "a.txt").write_text(PROMPT)
        (d / "stray.txt").write_text(PROMPT)
    outside = _image(tmp_path / "outside.png")
    lines = {"escape": {"image": "../outside.png", "prompt": PROMPT},
             "absolute": {"image": str(outside), "prompt": PROMPT},
             "missing_image": {"image": "images/nope.png", "prompt": PROMPT}}
    if setup in lines:
        (d / "pairs.jsonl").write_text(json.dumps(lines[setup]) + "\n")
    if setup == "bad_json":
        (d / "pairs.jsonl").write_text("{image: a.png}\n")
    with pytest.raises(ValueError, match=match) as e:
        cal.load_pairs(d)
    assert "\n" not in str(e.value)


def test_build_is_deterministic_and_refuses_to_overwrite(tmp_path):
    kw = dict(n_scenes=3, photo_scenes=1, include_matplotlib=False)
    m = cal.build(tmp_path / "a", **kw)
    assert m["counts"]["pairs"] == 5 and m["build"]["seed"] == 0
    again = cal.build(tmp_path / "b", **kw)["dataset_sha256"]
    assert again == m["dataset_sha256"] == cal.dataset_sha256(tmp_path / "a")
    cal.verify(tmp_path / "a")
    pairs = cal.load_pairs(tmp_path / "a")
    assert all(im.size == (224, 224) for im, _ in pairs)
    assert [s.source for s in cal.pair_specs(tmp_path / "a")][3:] == ["digitsvqa-train+sklearn-china.jpg",
                                                                       "digitsvqa-train+sklearn-flower.jpg"]
    (tmp_path / "a" / "README.md").write_text("kept")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="already exists; pass --force"):
        cal.build(tmp_path / "a", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == before           # no temp folder left behind
    m2 = cal.build(tmp_path / "a", seed=1, force=True, **kw)
    assert m2["dataset_sha256"] != m["dataset_sha256"] and "--seed 1" in m2["generator"]
    assert (tmp_path / "a" / "README.md").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_failed_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    cal.build(tmp_path / "a", n_scenes=1, photo_scenes=0, include_matplotlib=False)
    good = cal.dataset_sha256(tmp_path / "a")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(cal, "_versions", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        cal.build(tmp_path / "a", n_scenes=2, photo_scenes=0, include_matplotlib=False, force=True)
    with pytest.raises(RuntimeError):
        cal.build(tmp_path / "new", n_scenes=1, photo_scenes=0, include_matplotlib=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert cal.dataset_sha256(tmp_path / "a") == good


def test_cli_info_and_verify(tmp_path, capsys):
    d = tmp_path / "c"
    assert cal._main(["build", str(d), "--n-scenes", "2", "--photo-scenes", "0", "--no-matplotlib"]) == 0
    assert cal._main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "2 pairs" in out and "digitsvqa-train" in out and cal.dataset_sha256(d) in out
    assert cal._main(["verify", str(d)]) == 0
    assert cal._main(["build", str(d)]) == 1
    assert "already exists" in capsys.readouterr().err
