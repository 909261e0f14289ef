"""Calibration and validation samples from .npy, .npz and folders of images."""

import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tvm_qmfrg.calibration_data import Preprocess, load_samples, parse_preprocess
from tvm_qmfrg.errors import OptionError

DIGITS = {"input": ([1, 1, 8, 8], np.float32)}


def rgb_image(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8), "RGB").save(path)


def uniform(h, w, rgb):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3))


def image_folder(tmp_path, images, name="images"):
    folder = tmp_path / name
    folder.mkdir()
    for file, pixels in images.items():
        rgb_image(folder / file, pixels)
    return folder


def one_line_error(match):
    return pytest.raises(OptionError, match=match)


# --- arrays --------------------------------------------------------------------------------


def test_a_npy_file_feeds_the_one_input_cast_to_its_dtype(tmp_path):
    data = np.random.default_rng(0).random((5, 1, 8, 8))  # float64
    np.save(tmp_path / "x.npy", data)
    got = load_samples(tmp_path / "x.npy", DIGITS)
    assert list(got) == ["input"] and got["input"].dtype == np.float32
    np.testing.assert_array_equal(got["input"], data.astype(np.float32))


def test_the_sample_axis_may_differ_from_the_models_static_batch(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((7, 3, 4), np.float32))
    got = load_samples(tmp_path / "x.npy", {"x": ([2, 3, 4], np.float32)})
    assert got["x"].shape == (7, 3, 4)


def test_integer_arrays_go_into_integer_inputs(tmp_path):
    np.savez(tmp_path / "x.npz", ids=np.arange(12, dtype=np.int32).reshape(3, 4))
    got = load_samples(tmp_path / "x.npz", {"ids": ([1, 4], np.int64)})
    assert got["ids"].dtype == np.int64 and got["ids"][2, 3] == 11


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 4),
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
        st.tuples(
            st.lists(st.integers(1, 3), min_size=0, max_size=3),
            st.sampled_from(["float32", "float64", "int32", "int64"]),
        ),
        min_size=1,
        max_size=3,
    ),
    st.integers(0, 2**16),
)
def test_npz_arrays_round_trip_by_input_name(n, spec, seed):
    rng = np.random.default_rng(seed)
    arrays, inputs = {}, {}
    for name, (dims, dtype) in spec.items():
        arrays[name] = (rng.standard_normal((n, *dims)) * 100).astype(dtype)
        inputs[name] = ([1, *dims], np.float32 if dtype.startswith("float") else np.int64)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "samples.npz")
        np.savez(path, **arrays)
        got = load_samples(path, inputs)
    assert list(got) == list(inputs)
    for name, (_, dtype) in inputs.items():
        assert got[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[name], arrays[name].astype(dtype))


def test_a_missing_file_is_named_with_its_flag(tmp_path):
    with one_line_error(r"^--validate .*nope\.npz: no such file or folder$"):
        load_samples(tmp_path / "nope.npz", DIGITS, flag="--validate")


def test_an_unknown_file_format_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3\n")
    with one_line_error(r"x\.csv: unknown format '\.csv' \(give a \.npy or \.npz file"):
        load_samples(tmp_path / "x.csv", DIGITS)


def test_a_npy_file_needs_a_model_with_one_input(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    inputs = {"a": ([1, 4], np.float32), "b": ([1, 4], np.float32)}
    with one_line_error(r"a \.npy file holds one array, but the model has 2 inputs \(a, b\)"):
        load_samples(tmp_path / "x.npy", inputs)


def test_a_npz_file_must_hold_every_input(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((2, 4), np.float32))
    inputs = {"a": ([1, 4], np.float32), "b": ([1, 4], np.float32)}
    with one_line_error(r"no array for input\(s\) 'b' \(the file has: 'a'\)"):
        load_samples(tmp_path / "x.npz", inputs)


def test_extra_npz_arrays_are_named(tmp_path):
    np.savez(tmp_path / "x.npz", input=np.zeros((2, 1, 8, 8)), mask=np.zeros(2), ids=np.zeros(2))
    with one_line_error(
        r"array\(s\) 'mask', 'ids' name no model input \(the inputs are: 'input'\)"
    ):
        load_samples(tmp_path / "x.npz", DIGITS)


def test_a_shape_mismatch_names_the_input_and_both_shapes(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.float32))
    with one_line_error(
        r"x\.npy: input 'input' takes samples of shape \(N, 1, 8, 8\), the array has shape "
        r"\(4, 8, 8\)$"
    ):
        load_samples(tmp_path / "x.npy", DIGITS)


def test_an_array_without_the_sample_axis_is_refused_with_a_hint(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8), np.float32))
    with one_line_error(
        r"the leading axis must count the samples \(one sample: add it, x\[None\]\)"
    ):
        load_samples(tmp_path / "x.npy", DIGITS)


def test_an_array_without_samples_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((0, 1, 8, 8), np.float32))
    with one_line_error(r"input 'input': the array holds no samples"):
        load_samples(tmp_path / "x.npy", DIGITS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_values_are_refused_naming_the_first_sample(tmp_path, bad):
    data = np.zeros((6, 1, 8, 8), np.float32)
    data[3, 0, 2, 2] = data[5, 0, 0, 0] = bad
    np.save(tmp_path / "x.npy", data)
    with one_line_error(
        r"input 'input' holds 2 NaN/Inf value\(s\) \(as float32; first in sample 3\)"
    ):
        load_samples(tmp_path / "x.npy", DIGITS)


def test_values_beyond_float32_become_inf_and_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 1, 8, 8), 1e300))
    with one_line_error(r"holds 128 NaN/Inf value\(s\) \(as float32"):
        load_samples(tmp_path / "x.npy", DIGITS)


def test_float_arrays_are_not_rounded_into_integer_inputs(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    with one_line_error(r"input 'ids' is int64, the array is float32 \(floats are not rounded"):
        load_samples(tmp_path / "x.npy", {"ids": ([1, 4], np.int64)})


def test_integers_out_of_the_input_range_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.array([[0, 300]], np.int64))
    with one_line_error(r"input 'q' is uint8, the array's values \[0, 300\] do not fit"):
        load_samples(tmp_path / "x.npy", {"q": ([1, 2], np.uint8)})


def test_inputs_of_a_npz_must_agree_on_the_sample_count(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    inputs = {"a": ([1, 2], np.float32), "b": ([1, 2], np.float32)}
    with one_line_error(r"the inputs have different sample counts \('a' 3, 'b' 4\)"):
        load_samples(tmp_path / "x.npz", inputs)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_corrupt_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(b"PK\x03\x04 not really a zip, nor an array")
    with one_line_error(rf"x\{suffix}: not a readable \{suffix} file \("):
        load_samples(path, DIGITS)


def test_a_npz_under_a_npy_name_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", input=np.zeros((1, 1, 8, 8)))
    os.rename(tmp_path / "x.npz", tmp_path / "x.npy")
    with one_line_error(r"x\.npy: not a \.npy file \(it holds several arrays: name it \.npz\)"):
        load_samples(tmp_path / "x.npy", DIGITS)


def test_preprocess_is_refused_for_a_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    with one_line_error(r"x\.npy: --preprocess is for a folder of images, not a file"):
        load_samples(tmp_path / "x.npy", DIGITS, "scale=1/255")


# --- preprocessing specs -------------------------------------------------------------------


def test_the_documented_example_spec_parses():
    pre = parse_preprocess("size=224,mean=127.5,std=127.5,layout=NCHW,channels=RGB")
    assert pre == Preprocess(
        size=(224, 224), mean=(127.5,), std=(127.5,), layout="NCHW", channels="RGB"
    )


def test_per_channel_mean_and_std_and_a_fractional_scale_parse():
    pre = parse_preprocess(
        "size=240x320, resize=Shorter, mean=123.675/116.28/103.53, std=58.395/57.12/57.375, "
        "scale=1/255, layout=nhwc, channels=bgr"
    )
    assert pre.size == (240, 320) and pre.resize == "shorter"
    assert pre.mean == (123.675, 116.28, 103.53) and pre.std == (58.395, 57.12, 57.375)
    assert pre.scale == pytest.approx(1 / 255)
    assert (pre.layout, pre.channels) == ("NHWC", "BGR")


def test_omitted_keys_take_the_defaults():
    pre = parse_preprocess("scale=0.5")
    assert (pre.size, pre.channels, pre.resize, pre.layout) == (None, None, "stretch", "NCHW")
    assert (pre.mean, pre.std) == ((0.0,), (1.0,))


@settings(max_examples=50, deadline=None)
@given(
    st.tuples(st.integers(1, 4096), st.integers(1, 4096)),
    st.sampled_from(["stretch", "shorter"]),
    st.sampled_from(["RGB", "BGR"]),
    st.sampled_from(["NCHW", "NHWC"]),
    st.lists(st.floats(-300, 300, allow_nan=False), min_size=3, max_size=3),
    st.lists(st.floats(0.01, 300), min_size=1, max_size=1)
    | st.lists(st.floats(0.01, 300), min_size=3, max_size=3),
    st.permutations(range(6)),
)
def test_a_spec_written_in_any_key_order_parses_back(
    size, resize, channels, layout, mean, std, order
):
    items = [
        f"size={size[0]}x{size[1]}",
        f"resize={resize}",
        f"channels={channels}",
        f"layout={layout}",
        "mean=" + "/".join(repr(m) for m in mean),
        "std=" + "/".join(repr(s) for s in std),
    ]
    pre = parse_preprocess(",".join(items[k] for k in order))
    assert pre == Preprocess(
        size=size,
        resize=resize,
        channels=channels,
        layout=layout,
        mean=tuple(mean),
        std=tuple(std),
    )


@pytest.mark.parametrize(
    "spec, match",
    [
        ("size=224,crop=200", r"unknown key 'crop' \(keys: size, resize, channels, scale"),
        ("size=224,size=256", r"key 'size' is given twice"),
        ("size224", r"'size224' is not key=value"),
        ("size=0", r"size=0: must be N or HxW"),
        ("size=2x3x4", r"size=2x3x4: must be N or HxW"),
        ("size=-3", r"size=-3: must be N or HxW"),
        ("mean=1/2", r"mean=1/2: must be one number or three"),
        ("mean=a", r"mean=a: must be one number or one per channel"),
        ("mean=nan", r"mean=nan: must be finite"),
        ("std=1/0/1", r"std=1/0/1: must be > 0"),
        ("scale=1/0", r"scale=1/0: must be a number or a fraction A/B"),
        ("scale=-1", r"scale=-1: must be > 0"),
        ("layout=CHW", r"layout=CHW: choose from NCHW, NHWC"),
        ("channels=RGBA", r"channels=RGBA: choose from RGB, BGR, GRAY"),
        ("resize=fit", r"resize=fit: choose from stretch, shorter"),
        ("channels=GRAY,mean=1/2/3", r"mean=1/2/3: has 3 values, channels=GRAY has 1"),
        ("", r"--preprocess is empty; give at least one key=value"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_flag(spec, match):
    with pytest.raises(OptionError, match=match) as err:
        parse_preprocess(spec)
    assert str(err.value).startswith("--preprocess") and "\n" not in str(err.value)


# --- folders of images ---------------------------------------------------------------------

RGB_INPUT = {"image": ([1, 3, 4, 6], np.float32)}


def test_images_are_read_in_name_order_other_files_ignored(tmp_path):
    folder = image_folder(
        tmp_path, {"b.png": uniform(4, 6, (20, 20, 20)), "a.PNG": uniform(4, 6, (10, 10, 10))}
    )
    rgb_image(folder / "c.jpg", uniform(4, 6, (0, 0, 0)))
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()
    got = load_samples(folder, RGB_INPUT, "scale=1")["image"]
    assert got.shape == (3, 3, 4, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0, 0, 0], [10, 20, 0], atol=1.0)  # jpeg: nearly exact


def test_per_channel_mean_and_std_apply_in_channel_order(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(4, 6, (200, 100, 50))})
    got = load_samples(folder, RGB_INPUT, "mean=100/50/25,std=2/5/25")["image"][0]
    np.testing.assert_allclose(got[:, 0, 0], [50.0, 10.0, 1.0])
    assert np.all(got == got[:, :1, :1])


def test_bgr_reverses_the_channels_and_per_channel_values_follow_it(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(4, 6, (200, 100, 50))})
    got = load_samples(folder, RGB_INPUT, "channels=BGR,mean=50/0/0")["image"][0]
    np.testing.assert_allclose(got[:, 0, 0], [0.0, 100.0, 200.0])


def test_nhwc_puts_channels_last_and_the_scale_comes_first(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(4, 6, (255, 0, 51))})
    inputs = {"image": ([1, 4, 6, 3], np.float32)}
    got = load_samples(folder, inputs, "layout=NHWC,scale=1/255,mean=0.5,std=0.5")["image"]
    assert got.shape == (1, 4, 6, 3)
    np.testing.assert_allclose(got[0, 2, 3], [1.0, -1.0, -0.6], rtol=1e-6)


def test_gray_is_chosen_for_a_one_channel_input(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(8, 8, (90, 90, 90))})
    got = load_samples(folder, DIGITS, "scale=1/90")["input"]
    assert got.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(got, 1.0, rtol=1e-6)


def test_stretch_and_size_resize_to_the_models_size(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(30, 10, (7, 7, 7))})
    got = load_samples(folder, RGB_INPUT, "size=4x6,resize=stretch")["image"]
    assert got.shape == (1, 3, 4, 6)
    np.testing.assert_allclose(got, 7.0)


def test_shorter_resizes_the_shorter_side_then_crops_the_center(tmp_path):
    pixels = np.zeros((4, 12, 3), np.uint8)  # the shorter side is the size: no blending
    pixels[:, :4] = (255, 0, 0)
    pixels[:, 4:8] = (0, 255, 0)
    pixels[:, 8:] = (0, 0, 255)
    folder = image_folder(tmp_path, {"bands.png": pixels})
    inputs = {"image": ([1, 3, 4, 4], np.float32)}
    crop = load_samples(folder, inputs, "size=4,resize=shorter,scale=1/255")["image"][0]
    np.testing.assert_allclose(crop[1], 1.0, atol=1e-6)  # only the green middle band is left
    np.testing.assert_allclose(crop[[0, 2]], 0.0, atol=1e-6)
    stretched = load_samples(folder, inputs, "size=4,scale=1/255")["image"][0]
    assert stretched[0].max() > 0.9 and stretched[2].max() > 0.9


def test_unscaled_images_go_into_a_uint8_input(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(4, 6, (1, 2, 3))})
    got = load_samples(folder, {"image": ([1, 4, 6, 3], np.uint8)}, "layout=NHWC")["image"]
    assert got.dtype == np.uint8 and got[0, 0, 0].tolist() == [1, 2, 3]


def test_a_folder_needs_preprocess(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(8, 8, (0, 0, 0))})
    with one_line_error(r"--calibration .*images: a folder of images needs --preprocess \(e\.g\."):
        load_samples(folder, DIGITS)


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with one_line_error(r"empty: no images \(\.bmp, \.jpeg, \.jpg, \.png\) in the folder$"):
        load_samples(tmp_path / "empty", DIGITS, "scale=1")


def test_an_unreadable_image_is_named(tmp_path):
    folder = image_folder(tmp_path, {"a.png": uniform(8, 8, (0, 0, 0))})
    (folder / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    with one_line_error(r"images: cannot read image b\.jpg \("):
        load_samples(folder, DIGITS, "scale=1")


def test_images_need_a_single_4d_input(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(8, 8, (0, 0, 0))})
    two = {"a": ([1, 3, 8, 8], np.float32), "b": ([1, 4], np.float32)}
    with one_line_error(r"needs a model with one 4-D image input; it has 'a' \(1, 3, 8, 8\), 'b'"):
        load_samples(folder, two, "scale=1")
    with one_line_error(r"one 4-D image input; it has 'x' \(1, 64\)$"):
        load_samples(folder, {"x": ([1, 64], np.float32)}, "scale=1")


def test_a_size_that_is_not_the_models_names_both_shapes(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(8, 8, (0, 0, 0))})
    with one_line_error(
        r"--preprocess gives input 'input' samples of shape \(1, 9, 9\) \(layout NCHW, "
        r"channels GRAY, size 9x9\), the model wants \(1, 8, 8\)$"
    ):
        load_samples(folder, DIGITS, "size=9")


def test_a_channels_last_input_read_as_nchw_suggests_the_layout(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(8, 8, (0, 0, 0))})
    with one_line_error(
        r"has 8 channels at axis 1 \(layout NCHW\); images give 1 or 3; set layout"
    ):
        load_samples(folder, {"x": ([1, 8, 8, 3], np.float32)}, "scale=1")


def test_rgb_into_a_one_channel_input_names_both_shapes(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(8, 8, (0, 0, 0))})
    with one_line_error(r"samples of shape \(3, 8, 8\) .*the model wants \(1, 8, 8\)"):
        load_samples(folder, DIGITS, "channels=RGB")


def test_scaled_images_are_refused_for_an_integer_input(tmp_path):
    folder = image_folder(tmp_path, {"x.png": uniform(4, 6, (1, 2, 3))})
    with one_line_error(r"input 'image' is uint8: images go into it unscaled only"):
        load_samples(folder, {"image": ([1, 3, 4, 6], np.uint8)}, "mean=127.5")
