"""``--write``: a benchmark's table replaces its generated block of a markdown file."""

from fedmpi.bench import report


def test_write_appends_then_replaces_the_block_and_keeps_the_prose(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nWhat the numbers mean.\n")
    report.write(str(doc), "perf", "python -m fedmpi.bench perf", "speed-up 9.9x\n")
    first = doc.read_text()
    assert first.startswith("# Performance\n\nWhat the numbers mean.\n")
    assert "```\nspeed-up 9.9x\n```" in first and "by `python -m fedmpi.bench perf`" in first
    doc.write_text(first + "\nMore prose after the block.\n")
    report.write(str(doc), "perf", "python -m fedmpi.bench perf", "speed-up 10.4x")
    second = doc.read_text()
    assert "10.4x" in second and "9.9x" not in second  # the old numbers are gone
    assert second.count("<!-- bench:perf:start") == 1 == second.count("<!-- bench:perf:end")
    assert second.endswith("More prose after the block.\n")
    report.write(str(doc), "wait", "python -m fedmpi.bench wait", "sleep 0.07")
    third = doc.read_text()
    assert "10.4x" in third and "sleep 0.07" in third  # blocks are independent


def test_the_block_names_its_commit_and_machine(tmp_path):
    text = report.block("perf", "python -m fedmpi.bench perf", "x")
    assert "fedmpi " in text and "cores" in text and "torch " in text
    assert report.commit() != ""


def test_the_command_leaves_out_where_it_was_written():
    argv = ["--max-ranks", "11", "--write", "docs/performance.md", "--quick"]
    assert (report.command("python -m fedmpi.bench perf", argv, "docs/performance.md")
            == "python -m fedmpi.bench perf --max-ranks 11 --quick")
    assert report.command("p", ["--write=x.md", "-n", "3"], "x.md") == "p -n 3"
