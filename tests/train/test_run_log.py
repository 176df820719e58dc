"""metrics.jsonl of a resumed run: the rows its checkpoint covers stay, the rows a killed process wrote after it go."""
from __future__ import annotations

import json

from offset_cir.train.run_log import RunLog, covered_rows
from offset_cir.train.state import TrainState

ROWS = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "eval": {"R@1": 5.0}, "selection": 5.0},
        {"step": 3, "loss": 0.8}, {"step": 4, "loss": 0.7}]


def _write(path, rows, torn: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def test_resume_keeps_the_rows_the_checkpoint_counted_and_counts_on(tmp_path):
    _write(tmp_path / "metrics.jsonl", ROWS, torn='{"step": 5, "lo')  # killed while writing step 5
    log = RunLog(tmp_path, "run", enabled=True, curves=False)
    log.resume(TrainState(step=2, metrics_rows=3))  # checkpoint of step 2, saved after its evaluation row
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ROWS[:3]
    assert log.rows == 3
    log.row({"step": 3, "loss": 0.8})
    assert log.rows == 4 and (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == json.dumps(ROWS[3])


def test_nothing_written_after_the_checkpoint_leaves_the_file_as_it_is(tmp_path):
    _write(tmp_path / "metrics.jsonl", ROWS)
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    log = RunLog(tmp_path, "run", enabled=True, curves=False)
    log.resume(TrainState(step=4, metrics_rows=5))
    assert log.rows == 5 and (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before


def test_a_checkpoint_without_the_count_keeps_the_rows_up_to_its_step(tmp_path):
    lines = [json.dumps(r) + "\n" for r in ROWS] + ['{"step": 5, "lo']
    assert covered_rows(lines, TrainState(step=3)) == 4
    assert covered_rows(lines, TrainState(step=4)) == 5  # the torn line is never kept
    assert covered_rows(lines, TrainState(step=0)) == 0


def test_other_processes_touch_nothing(tmp_path):
    _write(tmp_path / "metrics.jsonl", ROWS)
    log = RunLog(tmp_path, "run", enabled=False)
    log.resume(TrainState(step=1, metrics_rows=1))
    log.row({"step": 2})
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == len(ROWS)


def test_tensorboard_hides_the_events_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in range(1, 6):  # the killed process logged steps 1-5; its checkpoint is of step 2
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.close()
    log = RunLog(tmp_path, "run", enabled=True, curves=False)
    log.resume(TrainState(step=2, metrics_rows=0))
    log.open_tensorboard()
    log.row({"step": 3}, {"train/loss": 0.25}, 3)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
