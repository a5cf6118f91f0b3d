"""runtime/infer.py: the slim runtime end to end on an exported tiny artifact — answers equal to the torch
pipeline, never importing torch, transformers or qapruner, and one-line errors for bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.build import build as build_engines
from export.artifact import Options, build
from qapruner import pipeline
from qapruner.scoring import Scoring

ROOT = Path(__file__).parent.parent
SCORING = Scoring(group_size=64)


@pytest.fixture(scope="module")
def artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-k12"
    build(tiny_dir, out, Options(keep=12, scoring=SCORING), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, im in enumerate(images):
        paths.append(d / f"im{i}.png")
        im.save(paths[-1])
    return paths


def _run(*args, check_rc=None):
    done = subprocess.run([sys.executable, str(ROOT / "runtime" / "infer.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if check_rc is not None:
        assert done.returncode == check_rc, done.stderr
    return done


def test_answers_equal_torch_and_batch(artifact, image_files, images, prompts, llava):
    args = [a for im, p in zip(image_files, prompts) for a in ("--image", im, "--prompt", p)]
    out = json.loads(_run("--engines", artifact, *args, "--json", "--max-new-tokens", "5", check_rc=0).stdout)
    reloaded = [Image.open(p).convert("RGB") for p in image_files]  # the PNGs the runtime read
    ref = pipeline.answer(llava, reloaded, prompts, keep=12, scoring=SCORING, max_new_tokens=5)
    assert out["answers"] == ref.texts
    assert [set(r) for r in out["kept_indices"]] == [set(r) for r in ref.indices.tolist()]
    assert set(out["timings"]) >= {"preprocess_s", "vision_prune_s", "prefill_s", "decode_s", "total_s", "load_s"}
    assert out["backend"] == "onnxruntime" and out["peak_rss_mb"] > 0 and out["keep"] == 12


def test_streams_text_for_one_image(artifact, image_files, prompts, llava):
    done = _run("--engines", artifact, "--image", image_files[0], "--prompt", prompts[0], "--max-new-tokens", "4",
                check_rc=0)
    ref = pipeline.answer(llava, [Image.open(image_files[0]).convert("RGB")], [prompts[0]], keep=12,
                          scoring=SCORING, max_new_tokens=4)
    assert done.stdout.strip() == ref.texts[0]


def test_never_imports_torch_transformers_or_qapruner(artifact, image_files):
    code = ("import sys, runpy; sys.argv = ['infer.py', '--engines', sys.argv[1], '--image', sys.argv[2], "
            "'--prompt', 'what digit ?', '--json']\n"
            "try:\n    runpy.run_path(sys.argv[0] if False else 'runtime/infer.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'qapruner', "
            "'export', 'polygraphy'))\nassert not bad, bad\nprint('CLEAN')")
    done = subprocess.run([sys.executable, "-c", code, str(artifact), str(image_files[0])], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0 and "CLEAN" in done.stdout, done.stderr


def test_engines_are_used_and_checked(artifact, image_files, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    info = build_engines(art, log=lambda m: None)
    assert info["backend"] == "onnxruntime" and (art / "vision.ort.onnx").is_file()
    out = json.loads(_run("--engines", art, "--image", image_files[0], "--prompt", "what ?", "--json",
                          check_rc=0).stdout)
    assert "optimised by make engines" in out["backend_reason"]
    # engines built for another K are refused
    doc = json.loads((art / "engines.json").read_text())
    (art / "engines.json").write_text(json.dumps({**doc, "artifact_keep": 99}))
    done = _run("--engines", art, "--image", image_files[0], "--prompt", "what ?")
    assert done.returncode == 2 and "K = 99" in done.stderr and "Traceback" not in done.stderr
    # a changed engine file is refused
    (art / "engines.json").write_text(json.dumps(doc))
    with open(art / "llm.ort.onnx", "ab") as f:
        f.write(b"\0")
    done = _run("--engines", art, "--image", image_files[0], "--prompt", "what ?")
    assert done.returncode == 2 and "changed since make engines" in done.stderr


@pytest.mark.parametrize("case", ["missing-image", "not-an-image", "empty-prompt", "two-placeholders",
                                  "missing-engines", "incomplete-engines", "old-format", "trt-absent", "grayscale-ok",
                                  "rgba-ok", "huge-image"])
def test_bad_input_is_one_line(case, artifact, image_files, tmp_path):
    image, prompt, engines = image_files[0], "what digit ?", artifact
    if case == "missing-image":
        image = tmp_path / "nope.png"
    elif case == "not-an-image":
        image = tmp_path / "notes.png"
        image.write_text("hello")
    elif case == "empty-prompt":
        prompt = "   "
    elif case == "two-placeholders":
        prompt = "USER: <image> <image> what ? ASSISTANT:"
    elif case == "missing-engines":
        engines = tmp_path / "nothing"
    elif case in ("incomplete-engines", "old-format"):
        engines = tmp_path / "copy"
        shutil.copytree(artifact, engines)
        if case == "incomplete-engines":
            (engines / "llm.onnx").unlink()
        else:
            m = json.loads((engines / "manifest.json").read_text())
            (engines / "manifest.json").write_text(json.dumps({**m, "format": "qapruner-artifact/0"}))
    elif case in ("grayscale-ok", "rgba-ok"):
        image = tmp_path / f"{case}.png"
        rng = np.random.default_rng(0)
        arr = rng.integers(0, 256, (50, 70) if case == "grayscale-ok" else (50, 70, 4), dtype=np.uint8)
        Image.fromarray(arr).save(image)
    elif case == "huge-image":
        image = tmp_path / "huge.png"
        Image.new("L", (9000, 6000)).save(image)  # 54 megapixels
    args = ["--engines", engines, "--image", image, "--prompt", prompt]
    if case == "trt-absent":
        args += ["--backend", "trt"]
    done = _run(*args)
    if case.endswith("-ok"):
        assert done.returncode == 0 and done.stdout.strip() != "", done.stderr
        return
    err = done.stderr.strip()
    assert done.returncode != 0 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
