"""Training killed with SIGKILL at any point and resumed ends exactly like a run that was never
killed: the same final weights, and one metrics record per epoch.

Each kill happens in a child process that trains with one function replaced by a version
that kills the process (os.kill(os.getpid(), SIGKILL): no handler, no clean-up runs) at a
chosen moment of epoch 2 of 3.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_train_e2e import TINY, make_colour_folder

from vistra.train import TrainConfig, resume, train

RUNNER = textwrap.dedent("""
    import io, json, os, signal, sys
    import torch
    import vistra.train.checkpoint as checkpoint
    import vistra.train.logger as logger
    import vistra.train.loop as loop
    from vistra.train import TrainConfig, train

    data, out, where, config = sys.argv[1], sys.argv[2], sys.argv[3], eval(sys.argv[4])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    EPOCH = [0]
    real_epoch = loop.train_one_epoch

    def tracked_epoch(*args, **kwargs):
        EPOCH[0] = args[6]
        return real_epoch(*args, **kwargs)

    loop.train_one_epoch = tracked_epoch

    if where == "mid-epoch":  # after the first optimizer step of epoch 2
        real_loss, steps = loop._loss, [0]

        def loss(*args):
            if EPOCH[0] == 2:
                steps[0] += 1
                if steps[0] == 2:
                    die()
            return real_loss(*args)

        loop._loss = loss
    elif where == "checkpoint-write":  # half of epoch 2's last.ckpt on disk, not renamed
        real_save = torch.save

        def torn_save(obj, f):
            if EPOCH[0] == 2:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                with open(f, "wb") as file:
                    file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    file.flush()
                    os.fsync(file.fileno())
                die()
            real_save(obj, f)

        checkpoint.torch.save = torn_save
    elif where == "before-metrics":  # epoch 2's last.ckpt written, its record not
        real_log = logger.RunLogger.log

        def log(self, record):
            if record["epoch"] == 2:
                die()
            real_log(self, record)

        logger.RunLogger.log = log
    elif where == "metrics-write":  # half of epoch 2's record appended
        def torn_append(path, line):
            if json.loads(line)["epoch"] == 2:
                with open(path, "a") as f:
                    f.write(line[: len(line) // 2])
                die()
            real_append(path, line)

        real_append = logger.append_line
        logger.append_line = torn_append
    train(TrainConfig(data=data, output=out, **config))
    sys.exit(3)  # not killed: the hook did not fire
""")

CONFIG = dict(model="vit_tiny_patch16_224", img_size=16, model_kwargs=TINY, epochs=3,
              batch_size=8, lr=1e-3, workers=0, quiet=True, threads=1, drop_path=0.1,
              mixup=0.4, warmup_epochs=0.5, ema=True, ema_decay=0.9, label_smoothing=0.1)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
def test_a_run_killed_anywhere_and_resumed_equals_the_uninterrupted_run(tmp_path):
    data = make_colour_folder(tmp_path / "data", per_class=6)
    threads = torch.get_num_threads()
    try:
        straight = train(TrainConfig(data=str(data), output=str(tmp_path / "straight"),
                                     **CONFIG))
    finally:
        torch.set_num_threads(threads)
    expected = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    for where in ("mid-epoch", "checkpoint-write", "before-metrics", "metrics-write"):
        run_dir = tmp_path / where
        killed = subprocess.run(
            [sys.executable, str(script), str(data), str(run_dir), where, repr(CONFIG)],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert killed.returncode == -9, (where, killed.returncode, killed.stderr[-2000:])
        try:
            resumed = resume(run_dir)
        finally:
            torch.set_num_threads(threads)
        final = torch.load(run_dir / "last.ckpt", weights_only=True)
        assert final["epoch"] == 3
        assert all(torch.equal(v, final["model"][k]) for k, v in expected["model"].items()), \
            where
        assert all(torch.equal(v, final["ema"]["module"][k])
                   for k, v in expected["ema"]["module"].items()), where
        assert [r["epoch"] for r in _records(run_dir)] == [1, 2, 3], where
        assert _without_time(_records(run_dir)) == _without_time(straight.history), where
        assert (resumed.best_top1, resumed.best_epoch) == (straight.best_top1,
                                                           straight.best_epoch)
        assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], where
