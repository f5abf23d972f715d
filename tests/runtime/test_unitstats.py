"""`run --stats`'s per-unit table: every column lines up, whatever the labels' lengths."""
import re

from layerpack_runtime.unitstats import UnitTimes


def _number_ends(row: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\d+\.\d", row)][-4:]


def test_table_columns_line_up_with_grouped_blocks():
    t = UnitTimes()
    placement = {"embed": "resident (stored form)", **{f"block.{i:03d}": "streamed" for i in range(30)}, "head": "resident"}
    for u in placement:
        t.add(u, 3 << 20, 0.004, 0.001, 0.002)
    header, *rows = t.table(2, placement).splitlines()
    assert [r.split()[0] for r in rows] == ["embed", "30", "head", "total"] and "30 blocks (mean)" in rows[1]
    header_ends = [header.index(h) + len(h) for h in ("MiB read", "read ms", "wait ms", "compute ms")]
    for row in rows:
        assert _number_ends(row) == header_ends, (header, row)
    label_width = header.index("placement")
    assert all(row[label_width - 1] == " " and row[label_width] != " " for row in rows[:3]), rows  # placements start together
