"""The main job end to end, cut down to one task, two methods and one epoch per run."""
import json
from dataclasses import replace

import pytest

from qtune.demo import demo_weights, run_demo
from qtune.experiments.spec import Candidate
from qtune.experiments.store import Trial
from qtune.experiments.planner import choose


def test_demo_writes_table_results_and_plot(tmp_path, capsys):
    summary = run_demo(tmp_path, methods=["linear", "vqt"], tasks=["dsprites_loc"], quick=True, progress=False,
                       epochs=1)
    assert [s["method"] for s in summary] == ["linear", "vqt"]
    for s in summary:
        assert 0.0 <= s["dsprites_loc"] <= 1.0 and s["mean_of_groups"] == s["mean_structured"]
        assert s["trainable_parameters"] > 0 and s["memory_bytes"] > 0
    for name in ("table.txt", "table.md", "summary.csv", "summary.json", "results.json", "accuracy_vs_memory.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert all(r["hparams"]["selection_accuracy"] is not None for r in rows)  # the choice was made on validation
    assert (tmp_path / "spec.toml").is_file() and (tmp_path / "store.sqlite").is_file()
    assert "dsprites_loc" in capsys.readouterr().out


def test_shipped_backbone_has_its_card():
    card = json.loads((demo_weights() / "config.json").read_text())
    assert card["architecture"] and card["model_args"]["depth"] == 12
    assert (demo_weights() / "model.safetensors").stat().st_size < 20 * 2**20


def test_the_choice_is_the_best_held_out_mean_and_ties_go_to_the_earlier():
    cands = [Candidate(i, {}, {"lr": lr}) for i, lr in enumerate((1.0, 2.0, 3.0))]
    scores = ([0.25, 0.25], [0.5, 0.5], [0.25, 0.75])  # means 0.25, 0.5, 0.5

    def trials(state: str = "done") -> list[Trial]:
        return [Trial(f"{c}-{f}", "t", "linear", "fold", f, 0, c, {}, state, m)
                for c, ms in enumerate(scores) for f, m in enumerate(ms)]

    best, score = choose(trials(), cands)
    assert (best.index, score) == (1, 0.5)
    assert choose(trials()[:-1] + [replace(trials()[-1], state="failed")], cands) is None  # incomplete: no choice
    assert choose([], cands[:1])[0] is cands[0]  # one candidate: nothing to choose, no selection trials


def test_tasks_in_parallel_processes_give_the_same_results(tmp_path):
    kwargs = {"methods": ["linear", "synqt"], "tasks": ["dsprites_loc", "clevr_count"], "quick": True,
              "progress": False, "epochs": 1}
    serial = run_demo(tmp_path, jobs=1, keep_caches=True, **kwargs)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one per task, kept
    parallel = run_demo(tmp_path, jobs=2, overwrite=True, **kwargs)  # same data and caches, results retrained
    assert not (tmp_path / "cache").exists()  # deleted at the end without keep_caches
    for task in kwargs["tasks"]:  # SynQT too: its figures once moved between runs, where a linear probe's did not
        assert [s[task] for s in serial] == [s[task] for s in parallel]


def test_demo_refuses_to_replace_results_without_overwrite(tmp_path):
    from qtune.errors import ConfigError

    kwargs = {"methods": ["linear"], "tasks": ["dsprites_loc"], "quick": True, "progress": False, "epochs": 1}
    run_demo(tmp_path, **kwargs)
    with pytest.raises(ConfigError, match="earlier demo"):
        run_demo(tmp_path, **kwargs)


def test_tables_name_groups_in_full_and_markdown_bolds_the_means():
    from qtune.report.tables import ResultRow, benchmark_table, format_markdown, format_table

    rows = [ResultRow("vqt", "digits", "natural", 0.5, 10, 2**20, "cpu", 1.0, {}),
            ResultRow("vqt", "dsprites_loc", "structured", 0.25, 10, 2**20, "cpu", 1.0, {})]
    summary = benchmark_table(rows, ["natural", "structured"])
    text = format_table(summary, ["digits", "dsprites_loc"], ["natural", "structured"])
    assert "natural" in text.splitlines()[0] and "mean of groups" in text.splitlines()[0]
    md = format_markdown(summary, ["digits", "dsprites_loc"], ["natural", "structured"]).splitlines()
    assert md[2].startswith("| vqt | 50.0 | 25.0 | **50.0** | **25.0** | **37.5** | 10 | 1.0 MiB |")


def test_demo_spec_follows_each_methods_recipe_and_the_paper_presets(tmp_path):
    from qtune.demo import DEMO_TASKS, demo_spec
    from qtune.experiments.spec import load_spec

    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(demo_spec(["linear", "vqt", "synqt"], list(DEMO_TASKS), demo_weights(), None, False, "fp16"))
    spec = load_spec(spec_file)
    assert "mnist" in spec.tasks and spec.selection == "val" and spec.seeds == [0]
    methods = {m.name: m for m in spec.methods}
    [synqt] = spec.candidates("dsprites_loc", methods["synqt"])  # the paper's fixed recipe: nothing to choose
    assert synqt.options == {"tokens": 16, "attn_scale": 0.1, "ffn_scale": 0.1, "feat_scale": 0.1}
    assert (synqt.train["lr"], synqt.train["weight_decay"], synqt.train["epochs"]) == (1e-3, 1e-2, 30)
    [plain] = spec.candidates("digits", methods["synqt"])  # no VTAB task of that name: the method's defaults
    assert plain.options == {} and plain.train["epochs"] == 30
    vqt = spec.candidates("dsprites_loc", methods["vqt"])
    assert [c.train["lr"] for c in vqt] == [0.25, 0.05] and vqt[0].options == {"tokens": 20}
    assert vqt[0].train["optimizer"] == "adam" and vqt[0].train["batch_size"] == 128
    assert [c.train["lr"] for c in spec.candidates("mnist", methods["linear"])] == [1e-2, 1e-3]
    spec_file.write_text(demo_spec(["synqt"], ["digits"], demo_weights(), 3, False, "fp16"))
    [short] = load_spec(spec_file).candidates("digits", load_spec(spec_file).methods[0])
    assert (short.train["epochs"], short.train["warmup_epochs"]) == (3, 0)
