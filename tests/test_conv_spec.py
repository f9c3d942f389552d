"""Layer description: derived sizes and clear errors for bad input."""
import pytest

from tvm_sparseconv.conv import Conv2DSpec, ConvSpecError, UnsupportedConvError, normalize_padding


def test_derived_sizes_asymmetric_padding_stride_dilation():
    s = Conv2DSpec.from_shapes((2, 6, 9, 8), (4, 3, 3, 2), stride=(2, 1), padding=(1, 0, 2, 1),
                               dilation=(1, 2), groups=2)
    assert (s.padded_h, s.padded_w) == (12, 9)
    assert (s.out_h, s.out_w) == ((12 - 3) // 2 + 1, (9 - 3) // 1 + 1)
    assert s.y_shape == (2, 4, 5, 7)
    assert s.macs == 2 * 4 * 5 * 7 * 3 * 3 * 2
    assert Conv2DSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("p, expect", [(1, (1, 1, 1, 1)), ((1, 2), (1, 2, 1, 2)), ((0, 1, 2, 3), (0, 1, 2, 3))])
def test_padding_forms(p, expect):
    assert normalize_padding(p) == expect


@pytest.mark.parametrize("xs, ws, kw, msg", [
    ((8, 10, 10), (4, 8, 3, 3), {}, "4-D NCHW"),
    ((1, 8, 10, 10), (4, 8, 3), {}, "4-D OIHW"),
    ((1, 8, 10, 10), (4, 6, 3, 3), {}, "activation has 8 channels"),
    ((1, 8, 10, 10), (4, 8, 3, 3), {"padding": -1}, "negative padding"),
    ((1, 8, 4, 4), (4, 8, 7, 7), {}, "does not fit"),
    ((1, 8, 10, 10), (4, 8, 3, 3), {"stride": 0}, "stride"),
    ((1, 8, 10, 10), (6, 2, 3, 3), {"groups": 3}, "groups=3 must divide"),
])
def test_bad_layers_get_clear_errors(xs, ws, kw, msg):
    with pytest.raises(ConvSpecError, match=msg):
        Conv2DSpec.from_shapes(xs, ws, **kw)


def test_require_names_the_attribute():
    s = Conv2DSpec.from_shapes((1, 8, 10, 10), (8, 4, 3, 3), groups=2)
    with pytest.raises(UnsupportedConvError, match="groups=2"):
        s.require("cpo")
    d = Conv2DSpec.from_shapes((1, 8, 10, 10), (8, 8, 3, 3), dilation=2)
    with pytest.raises(UnsupportedConvError, match=r"dilation=\(2, 2\)"):
        d.require("x", dilation=False)
