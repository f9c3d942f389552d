"""`tvm-sparseconv layer`: one layer through the kernels, with a knob search, checked against NumPy."""
import json

from tvm_sparseconv.cli import main
from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.algorithms import knob_space


def test_knob_space_defaults_first_then_a_fixed_spread_order():
    spec = Conv2DSpec.from_shapes((1, 64, 14, 14), (64, 64, 3, 3), 1, 1)
    a, b = knob_space("hybrid", spec), knob_space("hybrid", spec)
    assert a == b and len(a) > 12
    from tvm_sparseconv.algorithms import get_algorithm

    assert a[0] == get_algorithm("hybrid").knobs(spec, {})
    assert len({tuple(sorted(k.items())) for k in a}) == len(a)
    # a short prefix varies more than the grid's last axis (dense_from)
    assert len({k["block"] for k in a[1:12]} | {k["m_tile"] for k in a[1:12]}) > 2


def test_layer_command_searches_knobs_and_checks_every_candidate(capsys):
    args = ["layer", "--shape", "1,32,10,10", "-m", "48", "--density", "0.4", "--algorithms", "halo,hybrid,direct",
            "--knob-trials", "3", "--repeat", "2", "--json", "-q"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    spec = Conv2DSpec.from_dict(report["layer"])
    by_name = {r["algorithm"]: r for r in report["results"]}
    for name in ("halo", "hybrid"):
        r = by_name[name]
        assert r["error"] is None and r["knob_trials"] == 3
        assert r["max_abs_error"] < 1e-4
        assert r["knobs"] in knob_space(name, spec)[:3]
    assert by_name["direct"]["knob_trials"] == 1  # no knobs: measured once
