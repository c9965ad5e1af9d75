"""Budget fitting picks the largest knob whose measured step fits; the next one up does not."""
import pytest

from qtune.errors import ConfigError
from qtune.memory import fit_budget, knobs, measure_training, parse_bytes
from tests.conftest import tiny_backbone

B, C = 4, 10


def test_knobs_per_method():
    bb = tiny_backbone()
    assert [k.key for k in knobs("full", bb)] == ["trainable_blocks"]
    assert [k.key for k in knobs("synqt", bb)] == ["trainable_blocks", "tokens"]
    assert [k.key for k in knobs("vqt", bb)] == ["tokens"]
    assert [k.key for k in knobs("vpt_deep+synqt", bb)] == ["vpt_deep.trainable_blocks"]
    assert knobs("linear", bb) == []
    assert knobs("full", bb)[0].high == bb.depth


def test_binary_search_on_a_known_monotone_cost():
    bb = tiny_backbone(depth=7)
    calls = []

    def measure(options):
        calls.append(options["trainable_blocks"])
        return {"total": 100 * options["trainable_blocks"]}

    fit = fit_budget(measure, "full", bb, budget=450)
    assert fit["options"] == {"trainable_blocks": 4} and fit["fits"] and fit["total"] == 400
    assert fit["knobs"][0]["next_total"] == 500
    assert len(set(calls)) <= 2 + 3  # low, high, then log2(depth) probes
    assert not fit_budget(measure, "full", bb, budget=50)["fits"]
    assert fit_budget(measure, "full", bb, budget=10**6)["options"] == {"trainable_blocks": 7}


def test_fit_on_measured_steps():
    bb = tiny_backbone()

    def measure(options):
        return measure_training(bb, "full", options, batch_size=B, num_classes=C)

    totals = [measure({"trainable_blocks": k})["total"] for k in (1, 2, 3)]
    assert totals[0] < totals[1] < totals[2]
    budget = (totals[1] + totals[2]) // 2
    fit = fit_budget(measure, "full", bb, budget)
    knob = fit["knobs"][0]
    assert knob["value"] == 2 and fit["fits"]
    assert fit["total"] <= budget < knob["next_total"]
    probes = {p["options"]["trainable_blocks"]: p for p in fit["probes"]}
    assert probes[2]["fits"] and not probes[3]["fits"]


def test_side_path_tokens_and_methods_without_a_knob():
    bb = tiny_backbone()

    def measure(method):
        return lambda o: measure_training(bb, method, o, batch_size=B, num_classes=C)

    fit = fit_budget(measure("synqt"), "synqt", bb, 10**9, max_tokens=3)
    assert fit["options"] == {"trainable_blocks": bb.depth, "tokens": 3}
    linear = measure("linear")({})["total"]
    assert fit_budget(measure("linear"), "linear", bb, linear)["fits"]
    refused = fit_budget(measure("linear"), "linear", bb, linear - 1)
    assert not refused["fits"] and refused["knobs"] == []


@pytest.mark.parametrize("text,n", [("3GB", 3 * 10**9), ("2.5GiB", int(2.5 * 2**30)), ("800MB", 800 * 10**6),
                                    ("512 MiB", 512 * 2**20), ("4096", 4096), ("1.5g", int(1.5 * 2**30))])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "GB", "3 apples", "-1GB", "0MB", "1e3GB", "3GBB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match="memory size"):
        parse_bytes(text)
