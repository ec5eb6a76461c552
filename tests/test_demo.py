from monai_effq import demo


def test_publishing_the_demo_table_keeps_the_other_sections_of_results_md(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    results = tmp_path / "docs" / "results.md"
    results.write_text(f"# Demo results\n\n{demo.MARK_START}\nold\n{demo.MARK_END}\n\n## QAT\n\nkept\n")
    (tmp_path / "README.md").write_text(f"intro\n{demo.MARK_START}\nold\n{demo.MARK_END}\nrest\n")
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    demo.publish("| new |")
    text = results.read_text()
    assert "| new |" in text and "old" not in text and "## QAT\n\nkept" in text
    assert (tmp_path / "README.md").read_text() == f"intro\n{demo.MARK_START}\n| new |\n{demo.MARK_END}\nrest\n"


def test_a_results_file_without_markers_is_written_afresh(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    demo.publish("| t |")
    assert "| t |" in (tmp_path / "docs" / "results.md").read_text()


def test_each_bundle_gets_its_own_table_and_its_measured_mean_dice_in_the_metadata(tmp_path, monkeypatch):
    import json

    rows = [
        {"bundle": "lits_effq", "model": "FP32", "dice_liver": 0.95, "dice_mean": 0.93, "size_MiB": 4.5, "quantize_s": 0.0},
        {"bundle": "lits_effq", "model": "W4A8", "dice_liver": 0.94, "dice_mean": 0.92, "size_MiB": 0.6, "quantize_s": 9.0},
        {"bundle": "brats_effq", "model": "FP32", "dice_TC": 0.98, "dice_mean": 0.98, "size_MiB": 4.4, "quantize_s": 0.0},
    ]
    for name in ("lits_effq", "brats_effq"):
        (tmp_path / "bundles" / name / "docs").mkdir(parents=True)
        (tmp_path / "bundles" / name / "configs").mkdir()
        (tmp_path / "bundles" / name / "docs" / "README.md").write_text(f"# Performance\n{demo.MARK_START}\nold\n{demo.MARK_END}\n")
        (tmp_path / "bundles" / name / "configs" / "metadata.json").write_text(json.dumps({"version": "0.2.0", "eval_metrics": {}}))
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    demo.publish_per_bundle(rows)
    demo.record_eval_metrics(rows)
    lits = (tmp_path / "bundles" / "lits_effq" / "docs" / "README.md").read_text()
    assert "| W4A8 | 0.940 |" in lits and "dice_TC" not in lits
    meta = json.loads((tmp_path / "bundles" / "lits_effq" / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == {"mean_dice_fp32": 0.93, "mean_dice_w4a8": 0.92} and meta["version"] == "0.2.0"
