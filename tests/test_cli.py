from ms_ray.cli import main


def test_demo_prints_streams_side_by_side(capsys):
    assert main(["demo", "jobs/demo.yaml", "decode.max_new_rows=12"]) == 0
    out = capsys.readouterr().out
    table = [line.split("|") for line in out.splitlines() if line[:5].strip().isdigit()]
    assert len(table) == 12 and [int(r[0]) for r in table] == list(range(12))
    user = [r[1].strip() for r in table]
    # the scripted user text goes in word by word from row 1, then silence
    assert user[:8] == ["·", "hello", "there", "how", "are", "you", "today", "·"]
    assert user[10:12] == ["are", "you"]
    assert "session ended after 12 rows: max_rows" in out


def test_demo_rejects_a_bad_config(capsys):
    assert main(["demo", "jobs/demo.yaml", "model.num_heads=0"]) == 2
    assert "model.num_heads" in capsys.readouterr().err
    assert main(["demo", "jobs/demo.yaml", "script=[{row: 0, stream: output, text: hi}]"]) == 2
    assert "'output' is an output stream" in capsys.readouterr().err
    assert main(["demo", "jobs/demo.yaml", "script=[{row: 0, stream: tool, text: hi}]"]) == 2
    assert "unknown stream 'tool'" in capsys.readouterr().err
