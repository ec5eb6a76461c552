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
